"""The files API: upload, get, list, delete (each tenant its own files); and prediction outputs
and stored inputs served by unguessable URL."""

from __future__ import annotations

import hmac
import os
import tempfile

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import stored_inputs
from ..auth import Caller
from ..files import content_type_for, describe_bytes, disk_guard
from ..pages import paginate, parse_cursor
from ..predictions import decode_metadata, iso
from ..protocol import ApiError, FileChecksums, FileObject, FilePage, FileUrls, InvalidField, not_found, validation_failed
from ..records import FileRecord
from ..state import AppState, get_state, require_auth
from ..store import QuotaExceeded

router = APIRouter(tags=["files"])
outputs_router = APIRouter(tags=["outputs"])
METADATA_LIMIT = 1024 * 1024  # the largest `metadata` part, text field or file part alike


async def form_text(part) -> str | None:
    """A form field's text, whether it came as a plain field or as a file part (JSON Blob)."""
    if part is None or isinstance(part, str):
        return part
    data = await part.read(METADATA_LIMIT + 1)
    if len(data) > METADATA_LIMIT:
        raise ApiError(413, f"metadata is larger than {describe_bytes(METADATA_LIMIT)}.", "Payload Too Large")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise validation_failed([InvalidField(type="format", field="metadata", description="metadata must be UTF-8 JSON")]) from None


def render_file(record: FileRecord, base: str) -> FileObject:
    return FileObject(
        id=record.id,
        name=record.name,
        content_type=record.content_type,
        size=record.size,
        etag=record.md5,  # Replicate's etag is the file's MD5
        checksums=FileChecksums(sha256=record.sha256, md5=record.md5),
        metadata=record.metadata,
        created_at=iso(record.created_at),
        expires_at=iso(record.expires_at),
        urls=FileUrls(get=f"{base}/v1/files/{record.id}"),
    )


@router.post("/v1/files", status_code=201, response_model=FileObject, summary="Upload a file")
async def upload(request: Request, caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise ApiError(413, f"The file is larger than the {describe_bytes(limit)} limit.", "Payload Too Large")
    quotas = state.service.quotas
    # Refused before it is read: the file alone needs about this much room (a chunked body declares none).
    quotas.check_room(caller, max(0, min(int(declared), limit) - METADATA_LIMIT - 64 * 1024)
                      if declared and declared.isdigit() else 0)
    try:
        # Two file parts: the JavaScript client sends `metadata` as a JSON file part beside `content`.
        form = await request.form(max_files=2, max_fields=8, max_part_size=METADATA_LIMIT)
    except Exception:
        raise validation_failed([InvalidField(type="format", field="content", description="the body must be multipart/form-data")]) from None
    upload = form.get("content")
    if upload is None or isinstance(upload, str):
        await form.close()
        raise validation_failed([InvalidField(type="required", field="content", description="content is required")])
    name = form.get("filename") or upload.filename or "file"
    name = os.path.basename(str(name))[:255] or "file"
    try:
        metadata = decode_metadata(await form_text(form.get("metadata")))
    except ApiError:
        await form.close()
        raise
    content_type = form.get("type") if isinstance(form.get("type"), str) else upload.content_type
    tmp = None
    size = 0
    try:
        with disk_guard():
            fd, tmp = tempfile.mkstemp(dir=state.files.tmp)
            with os.fdopen(fd, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"The file is larger than the {describe_bytes(limit)} limit.", "Payload Too Large")
                    out.write(chunk)
            quotas.check_quota(caller, size)  # the disk was checked before: the file is on it now
            limits = quotas.limits(caller)  # checked again as its row is written, under the tenant's lock
            try:
                record = await run_in_threadpool(state.files.save_upload, tmp, name, content_type, metadata,
                                                 caller.tenant, limits)
            except QuotaExceeded as exc:
                raise quotas.refusal(exc, limits, lambda: 1) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        await form.close()
    return render_file(record, state.api_base(request))


def own_file(state: AppState, file_id: str, caller: Caller) -> FileRecord:
    """The file's record; another tenant's file is unknown (404)."""
    record = state.store.get_file(file_id)
    if record is None or not caller.sees(record.owner):
        raise not_found()
    return record


@router.get("/v1/files", response_model=FilePage, summary="List uploaded files")
async def list_files(request: Request, cursor: str | None = Query(None), caller: Caller = Depends(require_auth),
                     state: AppState = Depends(get_state)):
    base = state.api_base(request)
    page = paginate(lambda **kw: state.store.list_files(owner=caller.scope, **kw), parse_cursor(cursor),
                    f"{base}/v1/files")
    return FilePage(next=page.next, previous=page.previous, results=[render_file(r, base) for r in page.rows])


@router.get("/v1/files/{file_id}", response_model=FileObject, summary="Get a file's metadata")
async def get_file(file_id: str, request: Request, caller: Caller = Depends(require_auth),
                   state: AppState = Depends(get_state)):
    return render_file(own_file(state, file_id, caller), state.api_base(request))


@router.delete("/v1/files/{file_id}", status_code=204, summary="Delete a file")
async def delete_file(file_id: str, caller: Caller = Depends(require_auth), state: AppState = Depends(get_state)):
    own_file(state, file_id, caller)
    if not state.files.delete_upload(file_id):
        raise not_found()
    return Response(status_code=204)


@outputs_router.get("/outputs/{prediction_id}/{token}/{name}", summary="An output image (no auth; unguessable URL)",
                    response_class=FileResponse)
async def get_output(prediction_id: str, token: str, name: str, state: AppState = Depends(get_state)):
    record = state.service.get(prediction_id)
    if record is None or record.data_removed or not hmac.compare_digest(token.encode(), record.output_token.encode()):
        raise not_found()
    if not state.service.serves_output(record, name):
        raise not_found()
    # Off the event loop: with the files in the database, a first read streams it into this node's copy.
    path = await run_in_threadpool(state.files.output_path, prediction_id, name, record.output_run)
    if path is None:
        raise not_found()
    # FileResponse answers Range requests (206) and sends an ETag; the file keeps its name.
    return FileResponse(path, media_type=content_type_for(name), filename=name, content_disposition_type="inline",
                        headers={"Cache-Control": "private, max-age=3600"})


@outputs_router.get("/inputs/{prediction_id}/{token}/{name}",
                    summary="A prediction's long input (a data: URI as its bytes), as list pages and webhooks link it "
                            "(no auth; unguessable URL)")
async def get_input(prediction_id: str, token: str, name: str, state: AppState = Depends(get_state)):
    record = state.service.get(prediction_id)
    if record is None or record.data_removed or not hmac.compare_digest(
            token.encode(), state.service.input_token(prediction_id).encode()):
        raise not_found()
    item = next((s for s in state.service.stored(record) if s.name == name), None)
    path = await run_in_threadpool(state.files.input_path, prediction_id, item.index) if item else None
    if path is None or not path.is_file():
        raise not_found()
    media_type, download = stored_inputs.served_form(path)
    headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'none'; sandbox"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return StreamingResponse(stored_inputs.served_bytes(path), media_type=media_type, headers=headers)
