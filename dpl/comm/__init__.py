"""Everything between workers, in one package.

- :mod:`dpl.comm.point`: :class:`~dpl.comm.point.CommPoint`, the one point every collective passes
  (counted and timed), which runs every sync of a local method;
- :mod:`dpl.comm.flight`: :class:`~dpl.comm.flight.Flight`, a collective or a sync in flight;
- :mod:`dpl.comm.communicator`: the protocol of the collectives an engine provides;
- :mod:`dpl.comm.stacked`: the simulation's (a reduction over the worker axis);
- :mod:`dpl.comm.process_group`: torch.distributed's (one rank per worker);
- :mod:`dpl.comm.codecs`: what a local method's sync sends (the ``compression`` group), error feedback;
- :mod:`dpl.comm.drops`: workers whose contributions do not arrive (``faults``);
- :mod:`dpl.comm.cost`: the alpha-beta cost model (``network``), the traffic counts and the run's ledger;
- :mod:`dpl.comm.clock`: the workers' modelled compute time (``clock``).

A new way of talking between workers (streaming fragments, another transport) changes one module
here, not the trainer or the methods. Nothing outside this package calls a torch.distributed
collective or averages over the worker axis (``tests/test_comm.py`` greps for it).
"""
