"""What this server serves, as Replicate's models API describes it: one model, its one version, and
deployments of it.

The version id is the SHA-256 of the version's schema: stable for a given release of the server
(the same inputs give the same id on every machine and every start), new when the inputs change.
Every deployment name runs this model, as ``POST /v1/deployments/{owner}/{name}/predictions`` does.
"""

from __future__ import annotations

import functools
import hashlib
import json

from inference.inputs import PredictionInput

from .protocol import (
    MODEL_NAME,
    MODEL_OWNER,
    MODEL_REF,
    Account,
    ApiError,
    Deployment,
    DeploymentConfiguration,
    DeploymentRelease,
    ModelObject,
    ModelVersion,
    Status,
    not_found,
)

VERSION_CREATED_AT = "2024-11-21T00:00:00.000Z"  # FLUX.1 Fill [dev]'s release
COG_VERSION = "0.13.0"
DESCRIPTION = ("FLUX.1 Fill [dev]: inpainting and outpainting guided by a text prompt, "
               "served on this machine by flux-fill-server.")
LICENSE_URL = "https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev/blob/main/LICENSE.md"


def cog_schema() -> dict:
    """The model's schema in Cog's shape: what Replicate's version objects carry."""
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {
            "schemas": {
                "Input": PredictionInput.model_json_schema(),
                "Output": {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"},
                "Status": {"enum": [status.value for status in Status], "type": "string"},
            }
        },
    }


VERSION_ID = hashlib.sha256(json.dumps(cog_schema(), sort_keys=True).encode()).hexdigest()


@functools.cache
def version() -> ModelVersion:
    return ModelVersion(id=VERSION_ID, created_at=VERSION_CREATED_AT, cog_version=COG_VERSION,
                        openapi_schema=cog_schema())


def is_ours(owner: str, name: str) -> bool:
    return (owner, name) == (MODEL_OWNER, MODEL_NAME)


def check_model(owner: str, name: str) -> None:
    if not is_ours(owner, name):
        raise not_found()


def model(base: str, run_count: int) -> ModelObject:
    return ModelObject(
        url=f"{base}/",  # the model's page here: the mask-painting web page
        owner=MODEL_OWNER,
        name=MODEL_NAME,
        description=DESCRIPTION,
        visibility="public",
        github_url=None,
        paper_url=None,
        license_url=LICENSE_URL,
        run_count=run_count,
        cover_image_url=None,
        default_example=None,
        latest_version=version(),
    )


def deployment(owner: str, name: str, hardware: str, instances: int) -> Deployment:
    return Deployment(owner=owner, name=name, current_release=DeploymentRelease(
        number=1, model=MODEL_REF, version=VERSION_ID, created_at=VERSION_CREATED_AT,
        created_by=Account(type="organization", username=owner, name=owner, github_url=None),
        configuration=DeploymentConfiguration(hardware=hardware, min_instances=instances, max_instances=instances),
    ))


def invalid_version() -> ApiError:
    """Replicate's answer to a version that does not exist (status, title and detail as it sends them)."""
    return ApiError(422, "The specified version does not exist (or perhaps you don't have permission to use it?)",
                    "Invalid version or not permitted")


def resolve_version(value: str) -> str:
    """The prediction's ``version`` for the body's: "hidden" for the model ("owner/name", or
    "hidden" itself), the version id for "owner/name:<id>" or a bare "<id>"; anything else is 422."""
    ref, colon, version_id = value.partition(":")
    if "/" in ref:
        owner, _, name = ref.partition("/")
        if not is_ours(owner, name):
            raise invalid_version()
        if not colon:
            return "hidden"
        ref = version_id
    if ref == VERSION_ID:
        return VERSION_ID
    if ref == "hidden" and not colon:
        return "hidden"
    raise invalid_version()
