"""Proof of Attribution: from a result's gradient sketch and output text to contributor
weights in ppm, with the hashes of everything read. `agent` holds the Faust agent; the rest is
plain Python that `pipeline.verify` reuses to recompute a record."""

from pipeline.attribution.artifacts import AdapterArtifacts, ArtifactCache, load_artifacts
from pipeline.attribution.attributor import METHOD_NAME, METHOD_VERSION, attribute
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.attribution.parameters import current_parameters
from pipeline.attribution.processing import process_result

__all__ = [
    "METHOD_NAME",
    "METHOD_VERSION",
    "AdapterArtifacts",
    "ArtifactCache",
    "AttributionFailure",
    "FailureCode",
    "attribute",
    "current_parameters",
    "load_artifacts",
    "process_result",
]
