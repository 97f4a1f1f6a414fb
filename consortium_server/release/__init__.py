"""The release gate: a completed study's final model leaves the consortium only when every
site signed off the same model hash and the data-use policy allows it.

:mod:`~consortium_server.release.service` (rules), :mod:`~consortium_server.release.router`
(HTTP), :mod:`~consortium_server.release.card` (the model card) and
:mod:`~consortium_server.release.files` (the safetensors file). What a released model is
byte for byte (shared with the sites) is :mod:`concord_protocol.release`, and its file
:mod:`concord_protocol.model_file`.
"""
