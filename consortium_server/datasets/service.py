"""Publishing and reading the dataset catalogue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from concord_protocol.preprocessing import PreprocessingSpec
from concord_protocol.principals import Principal
from consortium_server.datasets.models import Dataset
from consortium_server.datasets.schemas import DatasetPublish
from consortium_server.errors import ConflictError, NotFoundError
from consortium_server.sites.service import require_own_active_site

__all__ = ["get_dataset", "get_datasets", "list_datasets", "model_input", "publish_dataset"]


def publish_dataset(session: Session, data: DatasetPublish, *, actor: Principal) -> Dataset:
    """Publish a dataset for the actor's own (active) site."""
    require_own_active_site(session, actor, data.site_id)
    if session.get(Dataset, data.id) is not None:
        raise ConflictError(
            f"Dataset {data.id!r} is already in the catalogue.", code="dataset.exists"
        )
    dataset = Dataset(**data.model_dump(mode="json"), published_by=actor.subject)
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    """The dataset or ``dataset.not_found``."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFoundError(f"No dataset with id {dataset_id!r}.", code="dataset.not_found")
    return dataset


def get_datasets(session: Session, dataset_ids: Sequence[str]) -> tuple[list[Dataset], list[str]]:
    """The datasets found (in the order asked) and the ids that are unknown."""
    found = {d.id: d for d in session.scalars(select(Dataset).where(Dataset.id.in_(dataset_ids)))}
    return [found[i] for i in dataset_ids if i in found], [i for i in dataset_ids if i not in found]


def list_datasets(
    session: Session, *, site_id: str | None = None, purpose: str | None = None
) -> list[Dataset]:
    """The catalogue, optionally filtered by site and allowed purpose."""
    query = select(Dataset).order_by(Dataset.id)
    if site_id:
        query = query.where(Dataset.site_id == site_id)
    datasets = list(session.scalars(query))
    if purpose:
        datasets = [d for d in datasets if purpose in d.allowed_purposes]
    return datasets


def model_input(
    feature_summary: Mapping[str, object], preprocessing: PreprocessingSpec | None = None
) -> tuple[tuple[int, ...], int] | None:
    """(input shape of one record, class count) of a study's network over a dataset.

    The shape is the feature summary's ``input_shape``, or ``(features,)`` for tabular
    data; the class count ``num_classes`` (default 2). ``None`` when the summary gives no
    shape. When the study's declared ``preprocessing`` fixes the output size
    (:meth:`~concord_protocol.preprocessing.PreprocessingSpec.output_spatial_shape`), that
    size replaces the published spatial shape and the channels stay the dataset's: every
    site makes its records that size, whatever size it published them at. The server sizes
    a study's model from this (it builds no network) and tells the uploading site which
    network the released bytes belong to.
    """
    shape = feature_summary.get("input_shape")
    if not isinstance(shape, list):
        features = feature_summary.get("features")
        if not isinstance(features, int):
            return None
        shape = [features]
    classes = feature_summary.get("num_classes", 2)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None
    fixed = preprocessing.output_spatial_shape() if preprocessing is not None else None
    if fixed is not None and len(dims) >= 2:
        dims = (dims[0], *fixed)
    return dims, int(classes) if isinstance(classes, int) else 2
