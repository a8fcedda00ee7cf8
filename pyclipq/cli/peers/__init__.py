"""Other runtimes as contenders of `pyclipq bench`: ONNX Runtime and OpenVINO, fp32 and int8.

`runtimes` exports the towers and drives `worker.py`, which builds and times each contender
in processes of its own (see its docstring for why).
"""
