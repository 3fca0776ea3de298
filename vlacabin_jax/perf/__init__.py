"""Performance measurement and modelling behind `python -m tools.mesh_bench` (DESIGN.md §8).

  measure.py      compile and time the trainer's own train step on one mesh
  hlo.py          collective ops and their bytes per step, read from compiled HLO text
  analytic.py     the minimum collective bytes a sharding needs (params, gradients, activations)
  projection.py   step time of a measured step projected to a GPU cluster (NVLink + InfiniBand)
  torch_train.py  a training loss on the PyTorch export mirror (the JAX/PyTorch comparison)
  autoregressive.py  an autoregressive action head on the same backbone (the DNFM latency baseline)
  aot.py          the trainer's programs compiled for absent GPUs / TPU slices (deviceless AOT)
  search.py       the layout search's candidates, pruning and choice (mesh x remat x microbatch)
  bench/          the benchmark engine: one entry function per mode, the worker subprocesses
"""
