"""``python -m tools.demo``: the demo (the earlier form of ``python -m tools demo``)."""

import runpy

runpy.run_module("tools.demo.demo", run_name="__main__", alter_sys=True)
