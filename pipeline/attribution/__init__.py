"""Proof of Attribution: from a result's gradient sketch and output text to contributor
weights in ppm, with the hashes of everything read. `agent` registers the processor on the
pipeline's Faust app; the rest is plain Python that `pipeline.verify` reuses to recompute a
record."""

from pipeline.attribution.artifacts import AdapterArtifacts, ArtifactCache, load_artifacts
from pipeline.attribution.attributor import METHOD_VERSION, MethodVersion, attribute
from pipeline.attribution.failures import AttributionFailure, FailureCode
from pipeline.attribution.parameters import DEFAULTS, ParameterSource
from pipeline.attribution.processing import process_result

__all__ = [
    "DEFAULTS",
    "METHOD_VERSION",
    "AdapterArtifacts",
    "ArtifactCache",
    "AttributionFailure",
    "FailureCode",
    "MethodVersion",
    "ParameterSource",
    "attribute",
    "load_artifacts",
    "process_result",
]
