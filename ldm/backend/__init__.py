"""The CPU backend: fast kernels and the operating system's memory machinery.

:mod:`~ldm.backend.layout` (tensor layouts), :mod:`~ldm.backend.onednn` (oneDNN's fused kernels behind one gate)
and :mod:`~ldm.backend.winograd` are pure computation, reached by the model only through
:mod:`ldm.modules.ops`; :mod:`~ldm.backend.memory` is the only module that talks to the C library and /proc.
Nothing here imports the model, the loaders or the application.
"""
