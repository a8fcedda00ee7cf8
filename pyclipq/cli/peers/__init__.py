"""Contenders of `pyclipq bench` timed in processes of their own: ONNX Runtime and OpenVINO
(fp32, int8, OpenVINO's default precision), and the pyclipq formats on a forced CPU kernel table.

`runtimes` exports the towers and drives `worker.py`, which builds and times each runtime
contender in processes of its own (see its docstring for why); `forced_isa` runs the pyclipq
formats with PYCLIPQ_CPU_ISA set, which pyclipq reads once per process.
"""
