"""A sweep packed into one process: ``hydra/launcher=packed``.

- :mod:`dpl.pack.groups`: which jobs may share a process (the packing rules).
- :mod:`dpl.pack.lockstep`: their trainers stepped together, fused where the engine allows.
- :mod:`dpl.pack.job`: each run checked, resumed and recorded as alone.

The launcher itself is ``hydra_plugins/dpl_launchers`` (Hydra finds launchers only there).
"""
