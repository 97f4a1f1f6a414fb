"""The released model as a file: the server's side of :mod:`concord_protocol.model_file`.

The server writes the safetensors file from what it stored at upload (the bytes every site
signed off and the uploading site's parameter layout) and the study's contract (the model
spec); nothing else goes into it, so the same model always gives the same file, whose hash
the model card can state.
"""

from __future__ import annotations

from concord_protocol.contract import StudyContract
from concord_protocol.model_file import ReleasedModelInfo, file_name, write_released_file
from concord_protocol.release import ModelLayout
from consortium_server.release.models import ReleasedModel
from consortium_server.studies.models import Study

__all__ = ["model_file"]


def model_file(study: Study, model: ReleasedModel) -> tuple[str, bytes] | None:
    """(file name, safetensors bytes) of ``model``; ``None`` when it has no layout."""
    if model.layout is None:
        return None
    layout = ModelLayout.model_validate(model.layout)
    contract = StudyContract.model_validate(study.contract)
    info = ReleasedModelInfo(
        study_id=study.id,
        contract_hash=study.contract_hash,
        model_sha256=model.model_sha256,
        spec=contract.model,
        input_shape=layout.input_shape,
        num_classes=layout.num_classes,
    )
    return file_name(study.id, contract.model), write_released_file(info, layout, model.data)
