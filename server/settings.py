"""Every option of the server, from flags and environment (``FLUX_FILL_*``). Read only here."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from inference.accel import MemoryMode
from inference.images import DEFAULT_MAX_PIXELS, FetchPolicy
from inference.inputs import MAX_OUTPUTS

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# OpenAI's image model families (every name of the current SDKs, and later ones of the same families) and ours.
OPENAI_MODELS = ("flux-fill-dev", "gpt-image-*", "chatgpt-image-*", "dall-e-*")
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def split_token(spec: str) -> tuple[str | None, str]:
    """An --api-token value as (tenant name, token): "NAME:TOKEN" names its tenant; anything else is
    a bare token, a tenant of its own. A token that itself holds a colon is given a name ("me:a:b")."""
    name, sep, token = spec.partition(":")
    if sep and token and _TENANT_NAME.fullmatch(name):
        return name, token
    return None, spec


class Settings(BaseSettings):
    """flux-fill serve options. Each is also read from FLUX_FILL_<NAME> (lists comma-separated)."""

    model_config = SettingsConfigDict(env_prefix="FLUX_FILL_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(5000, description="Port to bind.")
    weights: str = Field("tiny", description="Weights: a diffusers folder, a .safetensors file (with --components), a repo id, 'tiny' (the demo model), or 'null' (no model: a fixed picture after --null-delay-s, for benchmarks and tests).")
    null_delay_s: float = Field(0.0, ge=0, description="With --weights null: the seconds each prediction takes, spread over its steps.")
    simulated_gpus: int = Field(1, ge=1, le=10000, description="With --weights null: simulated GPUs this process runs, one worker thread each, each holding its own lease (benchmarks of the control plane).")
    segmenter: str | None = Field(None, description="Masks without a brush (mask_prompt, POST /v1/masks, the page's click to select): a SAM folder and a Grounding DINO folder (or Hugging Face repo ids in the local cache), comma-separated; or 'tiny' (random demo models built in code). Loaded once by the process that runs the workers. Without it mask_prompt is refused (422). Set it on API nodes too: they accept mask_prompt only when it is set.")
    segmenter_device: str | None = Field(None, description="Where the segmenter runs (e.g. cpu, cuda:1). Default: the first worker's device. About 1.1 GB for SAM ViT-B with Grounding DINO tiny in float32 (weights.md).")
    components: str | None = Field(None, description="With a single-file --weights: folder with VAE, text encoders, tokenizers, scheduler.")
    gpus: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Devices to run on, one worker each (e.g. cuda:0,cuda:1). Default: the first GPU, else the CPU.")
    data_dir: Path = Field(Path("./data"), description="Where the SQLite database, uploads and outputs live.")
    database: str | None = Field(None, description="The database of predictions and files: a postgresql:// URL (needs the postgres extra), or a SQLite file. Default: <data-dir>/flux-fill.sqlite3. A SQLite file serves one process; a PostgreSQL database serves any number of API nodes and workers.")
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Accepted API tokens, each a tenant: it sees only its own predictions and files. NAME:TOKEN names the tenant, and tokens given the same NAME share one. None: no auth, loopback only.")
    admin_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Tokens that see, cancel and delete every tenant's predictions and files; no quotas apply to them.")
    allow_unauthenticated: bool = Field(False, description="Allow binding a non-loopback address without any API token.")
    prefix: str = Field("", description="Also serve every route under this prefix, e.g. /replicate.")
    public_url: str | None = Field(None, description="Base URL clients reach the server at; https here makes outputs URLs instead of data URIs.")
    output_urls: Literal["auto", "data", "url"] = Field("auto", description="How outputs are written: auto: https URLs when --public-url is https; otherwise data: URIs in a single prediction (create, get, cancel, stream, webhook: the clients read files only from https: and data: strings) and URLs served by this server in list pages. data: data: URIs everywhere. url: URLs everywhere (on plain http the clients then return them as strings).")
    lora_dir: Path | None = Field(None, description="Folder of named LoRAs (.safetensors).")
    allow_lora_paths: bool = Field(False, description="Accept local file paths as lora_weights.")
    fast_mode: bool = Field(False, description="Honour go_fast: fp8 (torchao) on the GPU; a second transformer when memory allows, else every request runs fp8.")
    compile: bool | None = Field(None, description="Compile the transformer blocks at startup (cache in <data-dir>/compile-cache) and warm up the common sizes. Default: on with a CUDA GPU, off on the CPU; --no-compile turns it off.")
    memory_mode: MemoryMode = Field("default", description="default: bf16, everything on the GPU (about 34 GB: 40 GB+ cards); fp8: fp8 weights for the transformer and T5, everything on the GPU (24 GB cards); fp8-offload: fp8 weights, each model on the GPU only while it runs (16 GB cards); offload: bf16, each model on the GPU only while it runs (32 GB cards); sequential-offload: layer by layer (slowest, least memory).")
    step_cache: float = Field(0.0, ge=0, description="First-block step cache threshold (e.g. 0.05): skip the other blocks when a step changes little; 0 is off.")
    attention_backend: str = Field("default", description="diffusers attention backend name (e.g. _flash_3); default: PyTorch SDPA's choice (cuDNN on an H100).")
    max_queue: int = Field(5000, ge=1, description="Overload guard: predictions waiting at once before creates are refused with 429 and a Retry-After (the queue is durable; clients do not retry a POST, so keep it large).")
    retention_hours: float = Field(24.0, ge=0, description="Hours outputs are kept; 0 keeps them forever.")
    file_expiry_hours: float = Field(24.0, gt=0, description="Hours an uploaded file is kept.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, description="Largest upload to /v1/files.")
    max_body_bytes: int = Field(96 * 1024 * 1024, description="Largest request body (data URIs included).")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, description="Largest image accepted, in pixels (decompression bombs).")
    fetch_timeout_s: float = Field(FetchPolicy.timeout_s, description="Time limit to fetch an input URL.")
    fetch_max_redirects: int = Field(FetchPolicy.max_redirects, description="Redirects followed when fetching an input URL.")
    max_lora_bytes: int = Field(2 * 1024**3, ge=1, description="Largest LoRA download, in bytes (FLUX.1 LoRAs run from a few MB to over a GB).")
    lora_fetch_timeout_s: float = Field(600.0, gt=0, description="Time limit to download a LoRA (the whole download).")
    lora_cache_gb: float = Field(20.0, ge=0, description="Downloaded LoRAs kept in <data-dir>/loras, in GB; the least recently used go first.")
    block_private_urls: bool = Field(False, description="Refuse input and webhook URLs that point to private or loopback addresses (SSRF).")
    lease_s: float = Field(30.0, ge=1, description="How long a worker holds a running prediction without its heartbeat (renewed every third of it): a worker that stops answering this long (killed, powered off, cut off) has the prediction run again by another.")
    workers: bool = Field(True, description="Run GPU workers in this process. --no-workers makes an API node: it answers the API and leaves the running to `flux-fill worker` processes on the same --database.")
    blob_dir: Path | None = Field(None, description="A folder for uploads, long inputs and outputs, shared by every node of a --database (a shared volume). Default: --data-dir; with a postgresql:// --database, the files are kept in the database and each node's --data-dir holds its copies.")
    max_attempts: int = Field(3, ge=1, description="Runs a prediction gets: one interrupted this many times (the server stopped or was killed while it ran) fails instead of running again.")
    webhook_retry_s: float = Field(86400.0, ge=0, description="How long a failing final (completed) webhook is retried after its prediction ended, before it is given up: 1 s after the first failure, doubling, at most every --webhook-retry-max-interval-s. The attempts survive restarts: the webhook is owed in the database and sent by one node at a time, under the same webhook-id.")
    webhook_retry_max_interval_s: float = Field(600.0, gt=0, description="The longest wait between two attempts at a failing final webhook.")
    webhook_slots: int = Field(64, ge=1, description="Webhook POSTs in flight at once, all receivers together.")
    webhook_slots_per_destination: int = Field(4, ge=1, description="Webhook POSTs in flight at once to one receiver (scheme, host and port), so a slow receiver delays only its own webhooks.")
    max_batch: int = Field(MAX_OUTPUTS, ge=1, le=MAX_OUTPUTS, description="Outputs denoised together in one batch.")
    rate_limit_per_minute: int = Field(0, ge=0, description="Creates per token per minute; 0 is unlimited.")
    min_free_disk_mb: int = Field(64, ge=0, description="Below this much free disk (MB) uploads and creates are refused with 507 and queued predictions fail cleanly instead of half-writing outputs.")
    tenant_max_queued: int = Field(1000, ge=0, description="With tokens: predictions one tenant may have waiting at once before its creates get 429; 0 is unlimited.")
    tenant_max_stored_mb: int = Field(5120, ge=0, description="With tokens: megabytes one tenant may store (uploads, prediction inputs and outputs, until they expire) before its uploads and creates get 413; 0 is unlimited.")
    header_timeout_s: float = Field(10.0, gt=0, description="Time a client has, from connecting (or, on a kept-alive connection, from the first byte of its next request) to send a request's headers; then 408 and the connection is closed.")
    body_timeout_s: float = Field(120.0, gt=0, description="Time a client has to send a request's whole body once its headers are in; then 408 and the connection is closed.")
    keep_alive_timeout_s: int = Field(65, ge=1, description="An idle keep-alive connection is closed after this many seconds. Keep it longer than the idle time after which clients drop a pooled connection themselves (httpx 5 s, Node 4-5 s) and than the idle timeout of a load balancer in front (60 s on AWS's), or a client may send a request just as the server closes its connection and get no answer.")
    max_stream_watchers: int = Field(1000, ge=1, description="Streams (GET /v1/predictions/{id}/stream) open at once on one prediction on this node; past it 429.")
    database_connections: int = Field(10, ge=2, description="With a postgresql:// --database: the most connections this process keeps to it for its statements (files in the database travel on up to 8 more).")
    max_connections: int = Field(1000, ge=16, description="Connections open at once (at most the open-files limit less 256). Past it the connection idle the longest is closed; when all are busy with a request, a new one gets 503.")
    backlog: int = Field(2048, ge=1, description="Connections the operating system queues before the server accepts them.")
    max_header_bytes: int = Field(16384, ge=1024, description="Largest request line and headers, in bytes (400 past it).")
    openai_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(OPENAI_MODELS),
        description="Model names OpenAI's image API (/v1/images/edits, /v1/images/generations, GET /v1/models) accepts, "
                    "comma-separated: names or shell-style patterns (gpt-image-*). All run this server's model, FLUX.1 "
                    "Fill [dev]. The default is every image model name of the current openai SDKs (gpt-image-*, "
                    "chatgpt-image-*, dall-e-*) and flux-fill-dev. A request without a model is accepted; '*' accepts "
                    "any name.")
    previews: bool = Field(True, description="Keep a preview of each running prediction's picture as it forms (a cheap linear projection of the latents, a WebP at most every --preview-interval-s, at most 8 a prediction), for GET /v1/predictions/{id}/preview, streams opened with ?previews=true and the web page. --no-previews turns them off; the denoising then does nothing for them.")
    preview_interval_s: float = Field(0.5, gt=0, description="Least time between two previews of a running prediction, in seconds.")
    cog_api: str = Field("/cog", description="Where Cog's container HTTP API (what `cog serve` and a model's Cog image answer: POST /predictions, PUT /predictions/{id}, POST /predictions/{id}/cancel, GET /health-check) is served, on this server's queue: a path (default /cog: POST /cog/predictions), / for the root, where a Cog image serves it, or off. Under a path, GET <path>/ and <path>/openapi.json are Cog's discovery document and the model's Cog schema; at the root, / and /openapi.json stay this server's web page and schema.")
    cog_upload_url: str | None = Field(None, description="Cog's --upload-url: outputs of predictions made through Cog's API are PUT to <URL>/<file name> by the worker that made them, and answered as the uploaded URLs (the response's Location, else the URL put to, without its query) instead of data: URIs. Set it on the worker nodes too.")
    log_level: str = Field("info")

    @field_validator("gpus", "api_tokens", "admin_tokens", "openai_models", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("cog_api")
    @classmethod
    def _cog_api(cls, value: str) -> str:
        value = value.strip()
        return value if value.lower() == "off" else cls._prefix(value)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith("/"):
            value = "/" + value
        return value

    @model_validator(mode="after")
    def _tokens_are_unambiguous(self):
        seen: dict[str, str] = {}
        for spec in self.api_tokens:
            name, token = split_token(spec)
            if seen.setdefault(token, name or "") != (name or ""):
                raise ValueError("the same --api-token is given to two tenants")
        if set(seen) & set(self.admin_tokens):
            raise ValueError("a token is given both as --api-token and --admin-token")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens or self.admin_tokens)

    @property
    def bind_url(self) -> str:
        """The server's address as bound, for URLs made without a request (webhook bodies) when there
        is no --public-url: a wildcard host is shown as the machine's name."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address with no token unless told to explicitly."""
        if not self.auth_enabled and not self.loopback_only and not self.allow_unauthenticated:
            raise SystemExit(
                f"Refusing to serve {self.host} without an API token: anyone on the network could use it. "
                "Pass --api-token (or FLUX_FILL_API_TOKENS), or --allow-unauthenticated to accept the risk."
            )
