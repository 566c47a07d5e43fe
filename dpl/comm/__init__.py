"""Everything between workers, in one package.

- :mod:`dpl.comm.point`: :class:`CommPoint`, the one point every collective passes (counted and timed);
- :mod:`dpl.comm.communicator`: the :class:`Communicator` protocol, the collectives an engine provides;
- :mod:`dpl.comm.stacked`: :class:`StackedComm`, the simulation's (a reduction over the worker axis);
- :mod:`dpl.comm.process_group`: :class:`ProcessGroupComm`, torch.distributed's (one rank per worker);
- :mod:`dpl.comm.cost`: the α–β cost model, :class:`Traffic` and the run's :class:`CommLedger`;
- :mod:`dpl.comm.codecs`: what a local method's sync sends (``none`` is the exact average).

A new way of talking between workers (streaming fragments, another transport) changes one module
here, not the trainer or the methods. Nothing outside this package calls a torch.distributed
collective or averages over the worker axis (``tests/test_comm.py`` greps for it).
"""

from dpl.comm.communicator import Communicator
from dpl.comm.codecs import COMPRESSORS, Compression, PlainAverage, build_compression
from dpl.comm.cost import (CLOCKED_FIELDS, CommLedger, Traffic, bytes_sent, gather_bytes_sent, latency_s, param_bytes,
                           sync_time_s, transfer_s)
from dpl.comm.point import CommPoint
from dpl.comm.stacked import StackedComm

__all__ = ["CLOCKED_FIELDS", "COMPRESSORS", "CommLedger", "CommPoint", "Communicator", "Compression", "PlainAverage",
           "StackedComm", "Traffic", "build_compression", "bytes_sent", "gather_bytes_sent", "latency_s", "param_bytes",
           "sync_time_s", "transfer_s"]
