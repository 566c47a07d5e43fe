"""dpl: data-parallel learning, measured. ``python -m dpl`` trains, ``python -m dpl.report`` compares,
``python -m dpl.bench`` times; docs/architecture.md shows how the packages fit together."""
