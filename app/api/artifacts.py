"""/v1/artifacts: files jobs made for download (data exports), until they expire."""

from __future__ import annotations

import base64
from typing import Any

from flask import send_file
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from werkzeug.wrappers import Response

from app.api import get_owned
from app.artifacts import artifact_store, download_url, is_expired
from app.auth import authenticate
from app.models import Artifact
from app.schemas import ArtifactSchema

blp = Blueprint(
    "artifacts",
    __name__,
    url_prefix="/v1/artifacts",
    description="Files made by jobs, such as data exports.",
)
blp.before_request(authenticate)


def get_owned_artifact(artifact_id: str) -> Artifact:
    artifact = get_owned(Artifact, artifact_id, "artifact")
    if is_expired(artifact):
        abort(410, message=f"Artifact {artifact_id} has expired; run the export again.")
    return artifact


def _artifact_body(artifact: Artifact) -> dict[str, Any]:
    return {
        "id": artifact.id,
        "kind": artifact.kind,
        "job_id": artifact.job_id,
        "filename": artifact.filename,
        "content_type": artifact.content_type,
        "bytes": artifact.bytes,
        "sha256": artifact.sha256,
        "download_url": download_url(artifact.id),
        "created_at": artifact.created_at,
        "expires_at": artifact.expires_at,
    }


@blp.route("/<artifact_id>")
class ArtifactById(MethodView):
    @blp.response(200, ArtifactSchema)
    @blp.alt_response(410, description="The artifact has expired.")
    def get(self, artifact_id: str) -> dict[str, Any]:
        """Get an artifact: its size, checksum, expiry and download URL"""
        return _artifact_body(get_owned_artifact(artifact_id))


@blp.route("/<artifact_id>/download")
class ArtifactDownload(MethodView):
    @blp.response(200, description="The file.", content_type="application/octet-stream")
    @blp.alt_response(410, description="The artifact has expired.")
    def get(self, artifact_id: str) -> Response:
        """Download an artifact

        Streams the file with its `Content-Length` and SHA-256 (`X-Content-SHA256`,
        `Repr-Digest`, and the `ETag`); `Range` requests resume a download.
        """
        artifact = get_owned_artifact(artifact_id)
        path = artifact_store().path(artifact.location)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        if size != artifact.bytes:
            # Expired and swept between the row read and here, or lost: never serve
            # a file that is not the one the checksum describes.
            abort(410, message=f"Artifact {artifact_id} is no longer available.")
        response = send_file(
            path,
            mimetype=artifact.content_type,
            as_attachment=True,
            download_name=artifact.filename,
            etag=artifact.sha256,
            conditional=True,
            max_age=0,
        )
        digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
        response.headers["X-Content-SHA256"] = artifact.sha256
        response.headers["Repr-Digest"] = f"sha-256=:{digest}:"
        response.headers["Digest"] = f"sha-256={digest}"
        response.headers["Cache-Control"] = "private, no-store"
        return response
