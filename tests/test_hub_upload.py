"""``hub_upload.py``: the upload folder it builds loads with ``trust_remote_code=True`` in a Python that cannot import
this package, and its upload goes through huggingface_hub to a local stand-in of the Hub's HTTP API (no network).

The stand-in implements the endpoints huggingface_hub's classic upload path uses: repo and branch creation, README
metadata validation, ``preupload``, the git-LFS batch API with basic PUT transfers, and NDJSON commits. Uploads run
with ``HF_HUB_DISABLE_XET=1``: the Xet protocol (the default when ``hf_xet`` is installed) talks to a separate
content-addressed storage service that is not worth faking; both paths share ``create_repo``/``upload_folder``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import site
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from modeling_deepseek_v32 import DeepseekV32ForCausalLM
from modeling_deepseek_v32.conversion.shards import CheckpointError
from modeling_deepseek_v32.testing_utils import random_model, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "hub_upload.py"
REPO_ID = "me/tiny-v32"
TOKEN = "hf_" + "Fake0Token0For0Tests0Only0123456789"
SECRET_IN_CHECKPOINT = "hf_" + "SecretThatMustNeverBeUploaded0000000"


# -- local stand-in for the Hub API --------------------------------------------------------------------------------
class FakeHub:
    def __init__(self, storage: Path):
        self.storage = storage
        self.requests: list[tuple[str, str, str | None]] = []
        self.unexpected: list[str] = []
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline().strip():
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
                try:
                    status, payload = hub.route(self.command, self.path.split("?")[0], body, self.path)
                except Exception as exc:  # a bug in the stand-in or a malformed request: fail loudly
                    hub.unexpected.append(f"{self.command} {self.path}: {exc!r}")
                    status, payload = 500, {"error": repr(exc)}
                self._reply(status, payload)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method: str, path: str, body: bytes, full_path: str):
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data['organization']}/{data['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo"}
            self.repos[repo] = {"create": data, "branches": {"main"}}
            return 200, {"url": f"{self.url}/{repo}", "name": repo, "id": repo}
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's best-effort client telemetry
            return 200, {"standardEnvVars": [], "harnesses": {}}
        if method == "POST" and path == "/api/validate-yaml":
            yaml.safe_load(json.loads(body)["content"].split("---")[1])
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/([^/]+)", path)
        if method == "POST" and match:
            repo, action, revision = match.groups()
            if repo not in self.repos:
                return 404, {"error": "Repository not found"}
            if action == "branch":
                if revision in self.repos[repo]["branches"]:
                    return 409, {"error": "branch exists"}
                self.repos[repo]["branches"].add(revision)
                return 200, {}
            if revision not in self.repos[repo]["branches"]:
                return 404, {"error": f"Revision {revision} not found"}
            if action == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                          "shouldIgnore": False, "oid": None} for f in files]  # fmt: skip
                return 200, {"files": modes, "commitOid": "0" * 40}
            return self._commit(repo, revision, body)
        match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and match:
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.blobs:
                    entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}", "header": {}}}
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if method == "PUT" and match:
            if hashlib.sha256(body).hexdigest() != match.group(1):
                return 400, {"error": "sha256 mismatch"}
            self.blobs[match.group(1)] = body
            return 200, {}
        self.unexpected.append(f"{method} {full_path}")
        return 404, {"error": "not implemented by the stand-in"}

    def _commit(self, repo: str, revision: str, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        target = self.storage / repo / revision
        paths = []
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                content = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                content = self.blobs[value["oid"]]
                assert len(content) == value["size"]
            else:
                continue
            path = target / value["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            paths.append(value["path"])
        self.commits.append({"repo": repo, "revision": revision, "summary": header["summary"], "paths": paths,
                             "lfs": [i["value"]["path"] for i in lines if i["key"] == "lfsFile"]})  # fmt: skip
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


# -- fixtures ------------------------------------------------------------------------------------------------------
_REMOTE_LOAD = """
import sys
try:
    import modeling_deepseek_v32
except ModuleNotFoundError:
    pass
else:
    sys.exit("the package is importable here: " + modeling_deepseek_v32.__file__)
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

torch.set_num_threads(1)
folder, inputs, output = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.load(inputs)
with torch.no_grad():
    logits = model(ids).logits
greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
mtp = model.generate(ids, max_new_tokens=4, do_sample=False, use_mtp=True)
torch.save({"logits": logits, "greedy": greedy, "mtp": mtp, "class_module": type(model).__module__,
            "config_mapping": CONFIG_MAPPING["deepseek_v32"].__module__}, output)
"""


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    random_model(tiny_config(), seed=61).save_pretrained(directory, max_shard_size="500KB")
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (directory / ".env").write_text(f"HF_TOKEN={SECRET_IN_CHECKPOINT}\n")
    (directory / "server.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    (directory / "notes.txt").write_text("not part of a model repo\n")
    return directory


def _hub_upload_module():
    spec = importlib.util.spec_from_file_location("hub_upload_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    """Upload with the real CLI in a fresh process; meanwhile build the folder with ``--dry-run --local-dir`` (in
    this process, through the same ``main``) and load it in a fresh Python that cannot import the package."""
    root = tmp_path_factory.mktemp("hub")
    folder = root / "folder"
    with FakeHub(root / "remote") as hub:
        upload = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(checkpoint), "--repo-id", REPO_ID, "--private", "--revision", "dev"],
            env=_env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(root / "hf_home")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
        )  # fmt: skip
        try:
            results = _build_and_load(checkpoint, root, folder)
        finally:
            upload_out, upload_err = upload.communicate(timeout=300)
    return {**results, "upload": (upload.returncode, upload_out, upload_err), "hub": hub}


def _build_and_load(checkpoint, root, folder) -> dict:
    """``--dry-run --local-dir`` through ``main`` in this process, then the isolated remote-code load."""
    hub_upload = _hub_upload_module()
    contacted = []

    class NoHub:  # a dry run must not talk to the Hub at all
        def __init__(self, *args, **kwargs):
            contacted.append(args)

    import huggingface_hub

    real_api = huggingface_hub.HfApi
    huggingface_hub.HfApi = NoHub
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            build_code = hub_upload.main([str(checkpoint), "--repo-id", REPO_ID, "--local-dir", str(folder), "--dry-run"])
    finally:
        huggingface_hub.HfApi = real_api
    load = None
    if build_code == 0:
        isolated = root / "isolated"
        isolated.mkdir()
        ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(5))
        torch.save(ids, isolated / "ids.pt")
        (isolated / "load.py").write_text(_REMOTE_LOAD)
        # -S: no site module, so the editable install's .pth hook never runs; only site-packages itself is on
        # the path (via PYTHONPATH), the cwd and script directory hold nothing of ours.
        paths = os.pathsep.join(site.getsitepackages())
        load = subprocess.run(
            [sys.executable, "-S", str(isolated / "load.py"), str(folder), str(isolated / "ids.pt"), str(isolated / "out.pt")],
            env=_env(PYTHONPATH=paths, HF_MODULES_CACHE=str(isolated / "modules"), HF_HUB_OFFLINE="1"),
            capture_output=True, text=True, cwd=isolated, timeout=300,
        )  # fmt: skip
    return {
        "folder": folder,
        "build": (build_code, stdout.getvalue(), stderr.getvalue(), contacted),
        "load": load,
        "ids": None if load is None else torch.load(root / "isolated" / "ids.pt"),
        "loaded": None if load is None or load.returncode else torch.load(root / "isolated" / "out.pt"),
    }


# -- tests ---------------------------------------------------------------------------------------------------------
REMOTE_CODE = {"configuration_deepseek_v32.py", "modeling_deepseek_v32.py", "attention.py", "cache.py", "fp8.py",
               "indexer.py", "layers.py", "moe.py", "mtp_generation.py", "rope.py", "weights.py"}  # fmt: skip


def test_dry_run_builds_the_folder_and_prints_the_plan_without_contacting_the_hub(runs, checkpoint):
    code, stdout, stderr, contacted = runs["build"]
    assert code == 0, stdout + stderr
    assert "dry run: nothing uploaded" in stdout and f"repository: {REPO_ID}" in stdout
    assert contacted == []
    folder = runs["folder"]
    names = {p.name for p in folder.iterdir()}
    weights = {p.name for p in checkpoint.glob("*.safetensors")}
    assert weights | {"model.safetensors.index.json", "config.json", "generation_config.json", "README.md",
                      "tokenizer.json", "tokenizer_config.json"} <= names  # fmt: skip
    assert REMOTE_CODE <= names
    assert not names & {".env", "server.pem", "notes.txt"}
    for name in names:
        assert f"  {name}  " in stdout  # the file list
    # weights are hard links, not copies: publishing 690 GB must not need another 690 GB
    for name in weights:
        assert (folder / name).stat().st_ino == (checkpoint / name).stat().st_ino


def test_config_and_model_card(runs):
    folder = runs["folder"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV32ForCausalLM"] and config["model_type"] == "deepseek_v32"
    assert config["auto_map"]["AutoConfig"] == "configuration_deepseek_v32.DeepseekV32Config"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek_v32.DeepseekV32ForCausalLM"
    card = (folder / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "deepseek-ai/DeepSeek-V3.2" and {"deepseek_v32", "custom_code"} <= set(meta["tags"])
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True' in card
    for name in REMOTE_CODE:
        source = (folder / name).read_text()
        assert "Generated by hub_upload.py" in source
        assert not re.search(r"^\s*(from|import)\s+modeling_deepseek_v32\b", source, re.M), name
        assert "AutoConfig.register" not in source and "AutoModelForCausalLM.register" not in source


def test_remote_code_loads_without_the_package_and_matches_it(runs, checkpoint):
    load = runs["load"]
    assert load is not None and load.returncode == 0, (load.stdout + load.stderr)[-3000:]
    loaded = runs["loaded"]
    assert loaded["class_module"].startswith("transformers_modules.")
    # loading remote code registered nothing under the official model type in that process
    assert loaded["config_mapping"] == "transformers.models.deepseek_v32.configuration_deepseek_v32"
    torch.set_num_threads(1)
    model = DeepseekV32ForCausalLM.from_pretrained(checkpoint).eval()
    ids = runs["ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded["logits"])
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), loaded["greedy"])
    assert torch.equal(loaded["mtp"], loaded["greedy"])  # greedy MTP drafting must not change the output


def test_upload_goes_through_the_hub_api(runs):
    code, out, err = runs["upload"]
    assert code == 0, out + err
    hub = runs["hub"]
    assert hub.unexpected == []
    assert hub.repos[REPO_ID]["create"]["visibility"] == "private"
    assert "dev" in hub.repos[REPO_ID]["branches"]
    (commit,) = hub.commits
    assert commit["revision"] == "dev"
    folder = runs["folder"]  # the dry run built the same folder
    uploaded = hub.storage / REPO_ID / "dev"
    assert set(commit["paths"]) == {p.name for p in folder.iterdir()}
    for name in commit["paths"]:
        assert (uploaded / name).read_bytes() == (folder / name).read_bytes(), name
        assert TOKEN.encode() not in (uploaded / name).read_bytes()
    assert set(commit["lfs"]) == {p.name for p in folder.glob("*.safetensors")}
    api_calls = [(path, auth) for _, path, auth in hub.requests if path.startswith("/api/") or ".git/" in path]
    assert len(api_calls) >= 6
    # every call that acts on the repository carries the token (huggingface_hub's telemetry probe needs none)
    assert all(auth == f"Bearer {TOKEN}" for path, auth in api_calls if path != "/api/agent-harnesses"), api_calls
    assert "uploaded: " in out and TOKEN not in out + err


def test_folder_check_refuses_symlinks_secrets_and_tokens(tmp_path, monkeypatch):
    hub_upload = _hub_upload_module()
    (tmp_path / "config.json").write_text("{}")
    assert [f.path for f in hub_upload.check_folder(tmp_path)] == ["config.json"]
    (tmp_path / "link.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="link.json: is a symlink"):
        hub_upload.check_folder(tmp_path)
    (tmp_path / "link.json").unlink()
    (tmp_path / "id_rsa").write_text("key")
    with pytest.raises(CheckpointError, match="id_rsa: looks like a secret"):
        hub_upload.check_folder(tmp_path)
    (tmp_path / "id_rsa").unlink()
    (tmp_path / "notes.md").write_text(f"token {SECRET_IN_CHECKPOINT}")
    with pytest.raises(CheckpointError, match="notes.md: contains what looks like a Hugging Face token"):
        hub_upload.check_folder(tmp_path)
    (tmp_path / "notes.md").write_text("my-custom-token-value")
    with pytest.raises(CheckpointError, match="notes.md: contains"):
        hub_upload.check_folder(tmp_path, token="my-custom-token-value")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    (tmp_path / "notes.md").unlink()
    with pytest.raises(CheckpointError, match="no Hugging Face token"):
        hub_upload.push_folder(tmp_path, REPO_ID, hub_upload.check_folder(tmp_path))


def test_help_and_local_dir_safety(checkpoint, tmp_path, capsys):
    hub_upload = _hub_upload_module()
    with pytest.raises(SystemExit) as exit_info:
        hub_upload.main(["--help"])
    assert exit_info.value.code == 0 and "usage: python hub_upload.py" in capsys.readouterr().out
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        hub_upload.build_upload_folder(checkpoint, precious)
    with pytest.raises(CheckpointError, match="not an upload folder built by hub_upload.py"):
        hub_upload.build_upload_folder(checkpoint, precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    with pytest.raises(CheckpointError, match="overlaps input directory"):
        hub_upload.build_upload_folder(checkpoint, checkpoint / "upload")
