"""deploy/ (Docker Compose, Kubernetes), Dockerfile.cuda and docs/scale-out.md: the
files parse and hold what they say (API nodes, GPU workers, PostgreSQL holding the files, the
optional shared blob volume, the KEDA scaler), and every `flux-fill` flag and FLUX_FILL_* variable they use exists in the real
command line parser and settings. Nothing here starts a container or a cluster."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from collections import Counter
from functools import lru_cache
from pathlib import Path
from unittest import mock

import pytest

yaml = pytest.importorskip("yaml")

from server import cli  # noqa: E402
from server.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
IMAGE = "flux-fill-server"
SUBCOMMANDS = ("serve", "worker", "predict")
ENV_NAMES = {"FLUX_FILL_" + name.upper() for name in Settings.model_fields}
ENV_VAR = re.compile(r"\bFLUX_FILL_[A-Z0-9_]*[A-Z0-9]\b")


# -- the real parser ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def subparsers() -> dict[str, argparse.ArgumentParser]:
    """The parser `flux-fill` itself builds: cli.main is run until it would parse its arguments."""
    built: list[argparse.ArgumentParser] = []

    def grab(self, args=None, namespace=None):
        built.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab), pytest.raises(SystemExit):
        cli.main([])
    (parser,) = built
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flag_problems(subcommand: str, args: list[str], where: str) -> list[str]:
    """What is wrong with `flux-fill <subcommand> <args>`: flags the parser lacks, a flag that takes
    a value given none. Values themselves may be placeholders (<token>, ${VAR}, …) and are not read."""
    parser = subparsers()[subcommand]
    actions = parser._option_string_actions
    problems = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag, has_value, _ = arg.partition("=")
        action = actions.get(flag)
        if action is None:
            problems.append(f"{where}: `flux-fill {subcommand}` has no {flag}")
        elif action.nargs != 0 and not has_value and (i + 1 >= len(args) or args[i + 1].startswith("--")):
            problems.append(f"{where}: {flag} of `flux-fill {subcommand}` needs a value")
    return problems


def image_args(args: list[str]) -> tuple[str, list[str]]:
    """The subcommand and arguments of the image's entrypoint (deploy/docker-entrypoint.sh): a first
    argument serve, worker or predict picks the command, anything else goes to serve."""
    if args and args[0] in SUBCOMMANDS:
        return args[0], list(args[1:])
    return "serve", list(args)


# -- what the files say ------------------------------------------------------------------------

def readme_scale_out() -> str:
    """docs/scale-out.md, the page the README links for many nodes."""
    return (ROOT / "docs" / "scale-out.md").read_text()


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def yaml_invocations(path: Path) -> list[tuple[str, list[str], str]]:
    """Every command or args list of a container (compose service, Kubernetes container) of the image."""
    found = []
    for doc in load(path):
        for node in walk(doc):
            if not (isinstance(node, dict) and IMAGE in str(node.get("image", ""))):
                continue
            for key in ("command", "args"):
                value = node.get(key)
                if value is None:
                    continue
                args = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
                found.append((*image_args(args), f"{path.relative_to(ROOT)} {key}"))
    return found


COMMAND = re.compile(r"\bflux-fill\s+(serve|worker|predict)\b(.*)|\bflux-fill-server:\w+\s+(\S.*)")


def text_invocations(text: str, where: str, comments: bool) -> list[tuple[str, list[str], str]]:
    """Every `flux-fill serve|worker ...` (or `docker run ... flux-fill-server:TAG ...`) command line
    written in a text: a README, a Dockerfile, the comments of a YAML file. Lines continued with a
    backslash are joined; a command ends at a backtick, a pipe, `&&`, `;` or a comment."""
    lines = text.splitlines()
    if comments:
        lines = [re.sub(r"^\s*#\s?", "", line) for line in lines]
    logical = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for match in COMMAND.finditer(logical):
        subcommand, rest = (match.group(1), match.group(2)) if match.group(1) else (None, match.group(3))
        rest = re.split(r"`|\||&&|;|\s#", rest)[0]
        try:
            args = shlex.split(rest)
        except ValueError:  # an apostrophe in prose after the command
            args = rest.split()
        if subcommand is None:
            if not args or not (args[0] in SUBCOMMANDS or args[0].startswith("-")):
                continue  # the image named in prose or a build, not run
            subcommand, args = image_args(args)
        found.append((subcommand, args, where))
    return found


def all_invocations() -> list[tuple[str, list[str], str]]:
    found = text_invocations(readme_scale_out(), "docs/scale-out.md", comments=False)
    found += text_invocations((ROOT / "Dockerfile.cuda").read_text(), "Dockerfile.cuda", comments=True)
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        where = str(path.relative_to(ROOT))
        found += text_invocations(path.read_text(), where, comments=path.suffix in (".yaml", ".yml", ".sh", ".conf")
                                  or path.name == "env.example")
        if path.suffix in (".yaml", ".yml"):
            found += yaml_invocations(path)
    return found


def env_texts() -> dict[str, str]:
    texts = {"docs/scale-out.md": readme_scale_out(), "Dockerfile.cuda": (ROOT / "Dockerfile.cuda").read_text()}
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        texts[str(path.relative_to(ROOT))] = path.read_text()
    return texts


# -- flags and variables -----------------------------------------------------------------------

def test_the_checker_finds_a_flag_that_does_not_exist():
    written = "flux-fill worker --gpus cuda:0 --bogus-flag 3 --no-workers\n  `flux-fill serve --lease-s`"
    found = text_invocations(written, "example", comments=False)
    assert [(s, a) for s, a, _ in found] == [("worker", ["--gpus", "cuda:0", "--bogus-flag", "3", "--no-workers"]),
                                               ("serve", ["--lease-s"])]
    problems = [p for s, a, w in found for p in flag_problems(s, a, w)]
    assert problems == ["example: `flux-fill worker` has no --bogus-flag",
                        "example: `flux-fill worker` has no --no-workers",  # a worker always runs workers
                        "example: --lease-s of `flux-fill serve` needs a value"]
    # Both forms of a boolean flag exist, and image arguments go to serve unless they name a command.
    assert flag_problems("serve", ["--no-workers", "--workers", "--no-compile", "--blob-dir", "/b"], "x") == []
    assert image_args(["--weights", "/m"]) == ("serve", ["--weights", "/m"])
    assert image_args(["worker", "--gpus", "cuda:0"]) == ("worker", ["--gpus", "cuda:0"])


def test_every_command_line_in_deploy_the_dockerfile_and_the_readme_uses_real_flags():
    found = all_invocations()
    where = {(w.split(" ")[0], s) for s, _, w in found}
    # The extraction finds what is there (an empty list would pass anything).
    for source in ("docs/scale-out.md", "Dockerfile.cuda", "deploy/compose.yaml", "deploy/kubernetes/api.yaml",
                   "deploy/kubernetes/worker.yaml"):
        assert {s for w, s in where if w == source} & {"serve", "worker"}, (source, where)
    assert ("docs/scale-out.md", "serve") in where and ("docs/scale-out.md", "worker") in where
    problems = [p for s, a, w in found for p in flag_problems(s, a, w)]
    assert problems == []


def test_every_flag_written_alone_in_the_readme_exists():
    """`--flag` in docs/scale-out.md's prose and in every option table of the README and docs/."""
    serve, worker = subparsers()["serve"], subparsers()["worker"]
    known = set(serve._option_string_actions) | set(worker._option_string_actions)
    spans = re.findall(r"`(--[^`]+)`", readme_scale_out())
    tables = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    cells = re.findall(r"^\| (`--[^|]+)\|", tables, flags=re.M)  # first cells
    flags = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(spans + cells))
    assert {"--lease-s", "--webhook-retry-s", "--database", "--no-workers", "--blob-dir"} <= set(flags)
    assert sorted(set(flags) - known) == []


def test_every_flux_fill_variable_names_a_setting():
    used: dict[str, set[str]] = {}
    for where, text in env_texts().items():
        for name in ENV_VAR.findall(text):
            used.setdefault(name, set()).add(where)
    assert {"FLUX_FILL_DATABASE", "FLUX_FILL_BLOB_DIR", "FLUX_FILL_API_TOKENS"} <= set(used)
    assert {name: sorted(w) for name, w in used.items() if name not in ENV_NAMES} == {}


def yaml_environments() -> list[tuple[str, dict[str, str]]]:
    """Each set of FLUX_FILL_* variables a container of deploy/ is given with plain values."""
    found = []
    for path in yaml_files():
        for doc in load(path):
            for node in walk(doc):
                if not isinstance(node, dict):
                    continue
                env = node.get("environment") if isinstance(node.get("environment"), dict) else {}
                env = dict(env)
                env.update(node.get("data") or {} if node.get("kind") == "ConfigMap" else {})
                env.update(node.get("stringData") or {} if node.get("kind") == "Secret" else {})
                if isinstance(node.get("env"), list):
                    env.update({e["name"]: e["value"] for e in node["env"] if "value" in e})
                env = {k: str(v) for k, v in env.items() if k.startswith("FLUX_FILL_") and "${" not in str(v)}
                if env:
                    found.append((str(path.relative_to(ROOT)), env))
    return found


def test_the_values_given_to_flux_fill_variables_are_accepted(monkeypatch):
    found = yaml_environments()
    assert {w for w, _ in found} >= {"deploy/compose.yaml", "deploy/kubernetes/config.yaml",
                                     "deploy/kubernetes/worker.yaml"}
    for where, env in found:
        for name in list(os.environ):
            if name.startswith("FLUX_FILL_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = Settings()  # raises on a value of the wrong type
        if "FLUX_FILL_DATABASE" in env:
            assert settings.database.startswith("postgresql://"), where


# -- Docker Compose ----------------------------------------------------------------------------

def compose_services() -> dict[str, dict]:
    (doc,) = load(DEPLOY / "compose.yaml")
    return doc["services"]


def test_every_yaml_file_in_deploy_parses():
    assert {p.relative_to(DEPLOY).as_posix() for p in yaml_files()} >= {
        "compose.yaml", "kubernetes/kustomization.yaml", "kubernetes/api.yaml", "kubernetes/worker.yaml",
        "kubernetes/keda.yaml", "kubernetes/storage.yaml", "kubernetes/config.yaml"}
    for path in yaml_files():
        assert load(path), path


def test_compose_runs_postgresql_api_nodes_gpu_workers_and_a_load_balancer():
    doc = load(DEPLOY / "compose.yaml")[0]
    services = compose_services()
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert postgres["healthcheck"]["test"] and any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])

    ours = {name: s for name, s in services.items() if IMAGE in s.get("image", "")}
    apis = {n: s for n, s in ours.items() if image_args(s["command"]) == ("serve", ["--no-workers"])}
    workers = {n: s for n, s in ours.items() if image_args(s["command"])[0] == "worker"}
    assert len(apis) == 2 and len(workers) >= 1 and set(apis) | set(workers) == set(ours)

    devices = []
    for name, service in ours.items():
        env = service["environment"]
        assert env["FLUX_FILL_DATABASE"].startswith("postgresql://") and "@postgres:5432/" in env["FLUX_FILL_DATABASE"]
        assert "FLUX_FILL_BLOB_DIR" not in env, name  # the files are in PostgreSQL: no shared volume
        assert not any(str(v).startswith("blobs:") for v in service.get("volumes", [])), name
        assert env["FLUX_FILL_API_TOKENS"]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"]
        if name in workers:
            assert "--gpus" in service["command"] and service["command"][service["command"].index("--gpus") + 1] == "cuda:0"
            (reservation,) = service["deploy"]["resources"]["reservations"]["devices"]
            assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]
            assert len(reservation.get("device_ids", [])) == 1 or reservation.get("count") == 1
            devices += reservation.get("device_ids", [])
            assert "9100/health" in " ".join(service["healthcheck"]["test"])
    assert len(devices) == len(set(devices)), "two workers on one GPU"
    assert "postgres" in doc["volumes"] and "blobs" not in doc["volumes"]

    lb = services["nginx"]
    assert {n: c["condition"] for n, c in lb["depends_on"].items()} == {n: "service_healthy" for n in apis}
    conf_mount = next(v for v in lb["volumes"] if v.startswith("./"))
    conf = (DEPLOY / conf_mount.split(":")[0]).read_text()
    assert sorted(re.findall(r"^\s*server\s+([\w-]+):5000;", conf, flags=re.M)) == sorted(apis)


# -- Kubernetes --------------------------------------------------------------------------------

def k8s_docs() -> list[dict]:
    kustomization = load(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk  # every file is applied
    return [doc for name in listed for doc in load(K8S / name)]


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def port_number(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_kubernetes_has_api_nodes_gpu_workers_and_a_keda_scaler_and_the_files_in_postgresql():
    docs = k8s_docs()
    kinds = Counter(d["kind"] for d in docs)
    assert kinds["Deployment"] == 2 and kinds["ScaledObject"] == 1 and kinds["Service"] >= 1
    assert kinds["PersistentVolumeClaim"] >= 1 and kinds["Secret"] == 1
    by_kind = lambda kind: [d for d in docs if d["kind"] == kind]  # noqa: E731

    deployments = {image_args(containers(d)[0]["args"])[0]: d for d in by_kind("Deployment")}
    api, worker = deployments["serve"], deployments["worker"]
    assert api["spec"]["replicas"] == 2 and containers(api)[0]["args"] == ["serve", "--no-workers"]

    (box,) = containers(worker)
    assert str(box["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert box["args"][box["args"].index("--gpus") + 1] == "cuda:0"
    assert port_number(box, box["livenessProbe"]["httpGet"]["port"]) == cli.WORKER_PORT
    assert box["livenessProbe"]["httpGet"]["path"] == "/health"
    assert f"127.0.0.1:{cli.WORKER_PORT}/health" in " ".join(box["readinessProbe"]["exec"]["command"])

    # The files are in the database: no blob folder, and the only claim the nodes mount is the
    # workers' weights (read-only).
    assert "FLUX_FILL_BLOB_DIR" not in next(d for d in by_kind("ConfigMap"))["data"]
    (secret,) = by_kind("Secret")
    assert {"FLUX_FILL_DATABASE", "FLUX_FILL_API_TOKENS"} <= set(secret["stringData"])
    for deployment in (api, worker):
        spec = deployment["spec"]["template"]["spec"]
        claimed = [v["persistentVolumeClaim"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert all(c.get("readOnly") for c in claimed), deployment["metadata"]["name"]
        box_ = containers(deployment)[0]
        given = {e["secretRef"]["name"] for e in box_["envFrom"] if "secretRef" in e}
        given |= {e["valueFrom"]["secretKeyRef"]["name"] for e in box_.get("env", []) if "valueFrom" in e}
        assert given == {secret["metadata"]["name"]}, deployment["metadata"]["name"]  # the database URL, the tokens

    # The Service selects the API pods.
    labels = api["spec"]["template"]["metadata"]["labels"]
    (service,) = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()

    # KEDA scales the worker Deployment on the predictions table, connecting as the worker does.
    (scaled,) = by_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert re.search(r"FROM predictions WHERE status (=|IN \()\s*'starting'", trigger["metadata"]["query"])
    assert trigger["metadata"]["connectionFromEnv"] == "FLUX_FILL_DATABASE"
    assert "FLUX_FILL_DATABASE" in {e["name"] for e in box["env"]}  # named in env: KEDA reads it there


def test_the_shared_blobs_component_mounts_one_read_write_many_claim_at_the_blob_dir_of_every_node():
    """deploy/kubernetes/shared-blobs, the optional component: its claim is ReadWriteMany, its
    ConfigMap patch sets FLUX_FILL_BLOB_DIR, and its patches mount the claim there in the containers
    of both Deployments, by the names the base uses."""
    component = K8S / "shared-blobs"
    kustomization = load(component / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Component"
    docs = [doc for name in kustomization["resources"] for doc in load(component / name)]
    patches = [doc for patch in kustomization["patches"] for doc in load(component / patch["path"])]
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    base = {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs()}
    (config,) = [d for d in patches if d["kind"] == "ConfigMap"]
    assert ("ConfigMap", config["metadata"]["name"]) in base
    blob_dir = config["data"]["FLUX_FILL_BLOB_DIR"]
    patched = {d["metadata"]["name"]: d for d in patches if d["kind"] == "Deployment"}
    assert set(patched) == {name for kind, name in base if kind == "Deployment"}
    for name, patch in patched.items():
        (box,) = containers(patch)
        assert box["name"] == containers(base[("Deployment", name)])[0]["name"]
        (mount,) = box["volumeMounts"]
        (volume,) = patch["spec"]["template"]["spec"]["volumes"]
        assert mount == {"name": volume["name"], "mountPath": blob_dir}
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kustomization_renders_with_and_without_the_shared_blobs_component(tmp_path):
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = Counter(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    assert kinds["Deployment"] == 2 and kinds["ScaledObject"] == 1
    assert "FLUX_FILL_BLOB_DIR" not in out.stdout and "flux-fill-blobs" not in out.stdout
    # An overlay of the base with the component, as a user adds it.
    shutil.copytree(K8S, tmp_path / "kubernetes")
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(
        "resources:\n  - ../kubernetes\ncomponents:\n  - ../kubernetes/shared-blobs\n")
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path / "overlay")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["FLUX_FILL_BLOB_DIR"] == "/blobs" and config["data"]["FLUX_FILL_PUBLIC_URL"]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        (box,) = containers(deployment)
        mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
        assert mounts["/blobs"] == "blobs" and "/data" in mounts  # added to the base's, not in place of them
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["blobs"]["persistentVolumeClaim"]["claimName"] == "flux-fill-blobs"


# -- the image ---------------------------------------------------------------------------------

def test_the_image_installs_postgres_and_its_entrypoint_picks_the_command(tmp_path):
    dockerfile = (ROOT / "Dockerfile.cuda").read_text()
    assert re.search(r'pip install [^\n]*"\.\[[^\]]*\bpostgres\b[^\]]*\]"', dockerfile)
    copy = re.search(r"^COPY (?:--chmod=\d+ )?(deploy/\S+) (\S+)$", dockerfile, flags=re.M)
    assert copy and (ROOT / copy.group(1)).is_file()
    assert re.search(rf'^ENTRYPOINT \["{re.escape(copy.group(2))}"\]$', dockerfile, flags=re.M)
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "deploy" not in ignored and "deploy/" not in ignored

    if shutil.which("sh") is None:
        pytest.skip("no sh")
    fake = tmp_path / "flux-fill"
    fake.write_text('#!/bin/sh\necho "$*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def entry(*args: str) -> str:
        return subprocess.run(["sh", str(ROOT / copy.group(1)), *args], env=env, capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()

    assert entry() == "serve"
    assert entry("--help") == "serve --help"
    assert entry("--weights", "/models/x") == "serve --weights /models/x"
    assert entry("serve", "--no-workers") == "serve --no-workers"
    assert entry("worker", "--gpus", "cuda:0") == "worker --gpus cuda:0"
    assert entry("predict", "--help") == "predict --help"
