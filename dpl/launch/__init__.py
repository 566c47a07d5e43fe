"""Starting and supervising the K processes of ``engine=distributed``: spawned from one command or met
under torchrun or Slurm (:mod:`~dpl.launch.ranks`, :mod:`~dpl.launch.torchrun`, :mod:`~dpl.launch.slurm`),
listening where asked (:mod:`~dpl.launch.network`), and ended together when one fails
(:mod:`~dpl.launch.faults`)."""
