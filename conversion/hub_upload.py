#!/usr/bin/env python
"""Publish a DeepSeek-V3.2 checkpoint on the Hugging Face Hub so that it loads anywhere.

Builds an upload folder from a checkpoint directory, then pushes it with ``huggingface_hub``:

* the weights (hard links when possible, so even 690 GB costs no extra disk) and their index;
* ``config.json`` with ``architectures`` and an ``auto_map`` pointing at the remote code;
* ``generation_config.json`` (the checkpoint's, or one made from the config's special tokens);
* tokenizer files and licence, if the checkpoint has them;
* a model card (``README.md``) with YAML metadata: license, library_name transformers, pipeline_tag
  text-generation, base_model, tags;
* flat remote code (``configuration_deepseek_v32.py``, ``modeling_deepseek_v32.py`` and their sibling modules)
  generated from the installed package, so ``AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)``
  works where this package is not installed.

Run it as ``python hub_upload.py`` from a checkout, as ``deepseek-v32 upload`` or as
``python -m modeling_deepseek_v32.conversion.hub_upload``. The checkpoint is verified first (``modeling_deepseek_v32.conversion.verify``); nothing is written into it.
Only the files of the built folder are uploaded (an explicit allow-list), never symlinks, dotfiles or anything that
looks like a credential; the token comes from ``--token``, ``HF_TOKEN`` or ``hf auth login`` and is never printed.

    python hub_upload.py /data/v32-4L-32E --repo-id me/DeepSeek-V3.2-4L-32E --private
    python hub_upload.py /data/v32-4L-32E --repo-id me/DeepSeek-V3.2-4L-32E --dry-run   # plan and file list only
    python hub_upload.py /data/v32-4L-32E --local-dir /data/v32-4L-32E-hub                # build only

With ``hf_xet`` installed (the default), ``upload_folder`` streams large folders in several commits and resumes an
interrupted upload when run again.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

from modeling_deepseek_v32.conversion.checkpoint import INDEX_NAME, Checkpoint, load_config_dict
from modeling_deepseek_v32.conversion.output import check_disk_space, check_separate_directories, format_bytes
from modeling_deepseek_v32.conversion.remote_code import AUTO_MAP, RemoteCodeError, write_remote_code
from modeling_deepseek_v32.conversion.shards import CheckpointError
from modeling_deepseek_v32.conversion.verify import verify_checkpoint

DEFAULT_BASE_MODEL = "deepseek-ai/DeepSeek-V3.2"
ARCHITECTURE = "DeepseekV32ForCausalLM"
# Files next to the weights that belong in the repo when the checkpoint has them.
_CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
            "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "LICENSE", "LICENSE.txt", "LICENSE.md")  # fmt: skip
# Never uploaded, whatever the folder holds.
_SECRET_NAMES = re.compile(r"(^\.)|(^(id_rsa|id_ed25519|id_ecdsa|credentials|\.netrc)$)|(\.(pem|key|p12|pfx|kdbx)$)", re.I)
_HF_TOKEN = re.compile(rb"hf_[A-Za-z0-9]{30,}")
_TEXT_SUFFIXES = (".json", ".py", ".md", ".txt", ".jinja", ".model", ".yaml", ".yml")


@dataclass
class UploadFile:
    path: str  # relative to the folder
    size: int


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _place_weights(sources: list[Path], folder: Path, copy: bool) -> None:
    """Hard-link the weight files into ``folder`` (free, instant); copy those that cannot be linked, after checking
    the disk space, with a progress bar."""
    to_copy = []
    for source in sources:
        if not copy:
            try:
                os.link(source, folder / source.name)  # follows symlinks (e.g. a Hub cache snapshot) to the real file
                continue
            except OSError:
                pass  # another filesystem, or links not allowed: copy instead
        to_copy.append(source)
    if not to_copy:
        return
    check_disk_space(folder, sum(p.stat().st_size for p in to_copy))
    from tqdm.auto import tqdm

    with tqdm(total=sum(p.stat().st_size for p in to_copy), unit="B", unit_scale=True, desc="copying weights", file=sys.stderr) as bar:
        for source in to_copy:
            with open(source, "rb") as src, open(folder / source.name, "wb") as dst:
                while chunk := src.read(64 * 1024 * 1024):
                    dst.write(chunk)
                    bar.update(len(chunk))


def _model_card(
    config: dict, summary: dict, repo_id: str | None, base_model: str | None, license_id: str, tags: list[str], tokenizer: bool
) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        license=license_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model or None,
        tags=tags,
    )
    name = repo_id or "path/to/this/folder"
    title = repo_id.rsplit("/", 1)[-1] if repo_id else "DeepSeek-V3.2 checkpoint"
    fp8 = "quantization_config" in config
    body = f"""
# {title}

DeepSeek-V3.2 (MLA with DeepSeek Sparse Attention, DeepSeekMoE, multi-token prediction{", block-FP8 weights" if fp8 else ""})
packaged for 🤗 transformers.

| | |
|---|---|
| layers | {config.get("num_hidden_layers")} + {config.get("num_nextn_predict_layers", 0)} MTP |
| routed experts | {config.get("n_routed_experts")} ({config.get("num_experts_per_tok")} per token) + {config.get("n_shared_experts")} shared |
| hidden size | {config.get("hidden_size")} |
| parameters | {summary.get("parameters")} |
| weights | {summary.get("dtypes")}, {summary.get("size")} in {summary.get("files")} file(s) |

## Usage

```python
from transformers import AutoModelForCausalLM{", AutoTokenizer" if tokenizer else ""}

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, dtype="auto"){
    f'{chr(10)}tokenizer = AutoTokenizer.from_pretrained("{name}")' if tokenizer else ""}
```

`trust_remote_code=True` loads the modeling files shipped here (generated from the `deepseek-v32` package): the
lightning indexer with FP8 scoring, block-FP8 linears and MTP self-speculative decoding
(`model.generate(..., use_mtp=True)`). They run the PyTorch paths; `pip install deepseek-v32` adds the optional
Triton kernels and loads this repo without remote code. Pin a `revision` when loading remote code.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def build_upload_folder(
    checkpoint: str | Path,
    folder: str | Path,
    repo_id: str | None = None,
    base_model: str | None = DEFAULT_BASE_MODEL,
    license_id: str = "mit",
    tags: list[str] | None = None,
    copy_weights: bool = False,
    skip_verify: bool = False,
    overwrite: bool = False,
) -> list[UploadFile]:
    """Build the upload folder for ``checkpoint`` at ``folder`` (built under a temporary name, then renamed);
    returns its files. Raises ``CheckpointError`` if the checkpoint fails verification."""
    checkpoint, folder = Path(checkpoint), Path(folder)
    check_separate_directories([checkpoint], folder)
    report = verify_checkpoint(checkpoint)
    if not report.ok and not skip_verify:
        raise CheckpointError(f"{checkpoint} failed verification (pass --skip-verify to publish it anyway):\n  " + "\n  ".join(report.problems))
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{folder}: exists and is not empty; pass --overwrite to rebuild it")
        if not (folder / "modeling_deepseek_v32.py").is_file():
            # --overwrite replaces the whole folder: only ever one this script built
            raise CheckpointError(f"{folder}: is not an upload folder built by hub_upload.py; refusing to replace it")
    config = load_config_dict(checkpoint)
    weights = Checkpoint(checkpoint, strict=not skip_verify)

    partial = folder.with_name(f".{folder.name}.hub-upload-partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _place_weights([checkpoint / name for name in weights.files], partial, copy_weights)
        if weights.index is not None:
            shutil.copyfile(checkpoint / INDEX_NAME, partial / INDEX_NAME)
        config = {**config, "architectures": [ARCHITECTURE], "auto_map": dict(AUTO_MAP)}
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if (checkpoint / "generation_config.json").is_file():
            shutil.copyfile(checkpoint / "generation_config.json", partial / "generation_config.json")
        else:
            generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
            (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        for name in _CARRIED:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, partial / name)
        tag_list = ["deepseek_v32", "deepseek", "mixture-of-experts", "custom_code"] + (["fp8"] if "quantization_config" in config else [])
        tag_list += [t for t in (tags or []) if t not in tag_list]
        has_tokenizer = (partial / "tokenizer.json").exists() or (partial / "tokenizer.model").exists()
        card = _model_card(config, report.summary, repo_id, base_model, license_id, tag_list, has_tokenizer)
        (partial / "README.md").write_text(card, encoding="utf-8")
        write_remote_code(partial)
        files = check_folder(partial)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return files


def check_folder(folder: str | Path, token: str | None = None) -> list[UploadFile]:
    """List the files to upload, refusing symlinks, nested directories, dotfiles, key files, and text files that
    contain a Hugging Face token (``token`` itself included)."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink():
            raise CheckpointError(f"{path}: is a symlink; the upload folder must hold only its own regular files")
        if not path.is_file():
            raise CheckpointError(f"{path}: unexpected directory in the upload folder")
        if _SECRET_NAMES.search(path.name):
            raise CheckpointError(f"{path}: looks like a secret or hidden file; refusing to upload it")
        if path.suffix in _TEXT_SUFFIXES or path.name.startswith(("LICENSE", "README")):
            content = path.read_bytes()
            if _HF_TOKEN.search(content) or (token and token.encode() in content):
                raise CheckpointError(f"{path}: contains what looks like a Hugging Face token; refusing to upload it")
        files.append(UploadFile(path.name, path.stat().st_size))
    return files


def format_plan(files: list[UploadFile], folder: Path, repo_id: str | None, revision: str | None, private: bool) -> str:
    lines = [
        f"repository: {repo_id or '(none: build only)'}" + (" (private)" if private else ""),
        f"revision: {revision or 'main'}",
        f"folder: {folder}",
        f"files ({len(files)}, {format_bytes(sum(f.size for f in files))}):",
    ]
    lines += [f"  {f.path}  {format_bytes(f.size)}" for f in files]
    return "\n".join(lines)


def push_folder(
    folder: str | Path,
    repo_id: str,
    files: list[UploadFile],
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create the repo (and branch) if needed and upload exactly ``files`` from ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise CheckpointError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    check_folder(folder, token)  # again, right before sending: the folder may have been touched since it was built
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message or "Upload DeepSeek-V3.2 checkpoint with hub_upload.py",
        allow_patterns=[glob.escape(f.path) for f in files],
        ignore_patterns=[".*", "**/.*"],
    )
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None, prog: str = "python hub_upload.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build a Hub upload folder (weights, config with auto_map, generation config, tokenizer, model "
        "card, flat remote code) from a DeepSeek-V3.2 checkpoint and push it with huggingface_hub.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (safetensors + config.json); never modified")
    parser.add_argument("--repo-id", help="target repository, e.g. me/DeepSeek-V3.2-bf16 (omit with --local-dir to build only)")
    parser.add_argument("--local-dir", help="build the folder here and keep it; without --repo-id nothing is uploaded")
    parser.add_argument("--dry-run", action="store_true", help="build, print the plan and the file list, upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the token saved by `hf auth login`)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="model card base_model ('' for none; default %(default)s)")
    parser.add_argument("--license", default="mit", help="model card license (default %(default)s)")
    parser.add_argument("--tag", action="append", default=[], help="extra model card tag (repeatable)")
    parser.add_argument("--copy-weights", action="store_true", help="copy weight files instead of hard-linking them")
    parser.add_argument("--skip-verify", action="store_true", help="publish even if the checkpoint fails verification")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing --local-dir")
    args = parser.parse_args(argv)
    if not args.repo_id and not args.local_dir:
        parser.error("give --repo-id to upload, or --local-dir to build only")

    temporary = None
    if args.local_dir:
        folder = Path(args.local_dir)
    else:
        # Next to the checkpoint, so weights can be hard-linked (same filesystem); the system temp dir otherwise.
        try:
            temporary = Path(tempfile.mkdtemp(prefix=".hub-upload-", dir=Path(args.checkpoint).resolve().parent))
        except OSError:
            temporary = Path(tempfile.mkdtemp(prefix="hub-upload-"))
        folder = temporary / "upload"
    try:
        files = build_upload_folder(
            args.checkpoint, folder, args.repo_id, args.base_model, args.license, args.tag, args.copy_weights,
            args.skip_verify, args.overwrite,
        )  # fmt: skip
        print(format_plan(files, folder, args.repo_id, args.revision, args.private))
        if args.dry_run or not args.repo_id:
            print("dry run: nothing uploaded" if args.dry_run else f"built {folder}; nothing uploaded (no --repo-id)")
            return 0
        url = push_folder(folder, args.repo_id, files, args.token, args.private, args.revision, args.commit_message)
        print(f"uploaded: {url}")
        return 0
    except (CheckpointError, RemoteCodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except HfHubHTTPError as exc:
        print(f"error: the Hub refused the upload: {exc}\nrun the same command again to resume", file=sys.stderr)
        return 1
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
