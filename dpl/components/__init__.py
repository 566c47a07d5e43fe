"""What a run is made of: datasets (:mod:`~dpl.components.data`), models (:mod:`~dpl.components.models`) and
optimizers (:mod:`~dpl.components.optim`); each package registers its options with their schemas."""
