"""The command-line application: flags and one-line errors (:mod:`~ldm.app.cli`), a whole run of a script
(:mod:`~ldm.app.run`), input files (:mod:`~ldm.app.image_io`), output files (:mod:`~ldm.app.output`) and torchrun
sharding (:mod:`~ldm.app.distributed`). The only layer that changes process-wide settings, and only while a run
lasts."""
