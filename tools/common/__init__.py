"""Helpers shared by the tools and the tests; each module has one job.

* ``bundles``: where the bundles are, making ``import scripts`` load a given bundle, parsing a
  bundle's configs, the ``monai.bundle run`` command line of a bundle run;
* ``processes``: child processes: shell quoting, streamed bundle commands, fresh-process measurements;
* ``machine``: a description of the machine and software that numbers were taken on;
* ``memory``: peak and current resident memory of this process (``/proc``, ``getrusage``);
* ``peak``: the limit: FLOPs of a network call (PyTorch's flop counter) and the device's peak FLOP/s;
* ``timing``: devices, synchronised timing, progress lines;
* ``engines``: timing the iterations of a bundle's trainer (an ignite engine);
* ``stats``: small numeric helpers for reports (mean, ratio, number formatting);
* ``scalars``: scalars from TensorBoard event files;
* ``submission``: leaderboard submissions: checking a predicted label map against its test image, atomic zips;
* ``cli``: a function exposed as a command line by ``fire``, with logging and a failure message.
"""
