"""`lorakit push`: the model card of a real tiny run, and the upload against a loopback stand-in for the Hub API.

The Hugging Face Hub is out of reach here, so the upload runs against `HubStandIn`: a loopback stand-in for the Hub
API, a small HTTP server on 127.0.0.1 that answers the requests huggingface_hub's `create_repo` and `create_commit`
send (create the repository, validate the card's YAML, ask each file's upload mode, commit) and keeps the files it
receives. It answers "regular" for every file, so file contents arrive base64-encoded in the commit itself; the
Hub's LFS and Xet transfers of large files are not exercised.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from lorakit import cli, finetune
from lorakit.analysis.card import card_facts, card_metadata, front_matter, model_card
from lorakit.commands.merge import merge_to_folder
from lorakit.config import read_yaml
from lorakit.models import hub_unreachable

TOKEN = "hf_stand_in_token"


class HubStandIn(ThreadingHTTPServer):
    """A loopback stand-in for the Hub API (see the module docstring); `repos[repo_id]` holds what arrived."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, dict] = {}  # repo_id -> {"create": payload, "files": {path: bytes}, "commits": [...]}
        self.tokens: list[str] = []  # the Authorization header of every API call
        self.validated: list[str] = []  # README contents sent to validate-yaml
        self.unexpected: list[str] = []  # requests the stand-in does not know
        self.refuse: set[str] = set()  # repo ids whose commits get 403

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:  # lorakit's reachability probe
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub = self.server
        hub.tokens.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.repos[repo_id] = {"create": payload, "files": {}, "commits": []}
            return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
        if self.path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            hub.validated.append(content)
            try:
                front_matter(content)
            except yaml.YAMLError as error:
                return self._reply(400, {"errors": [{"message": str(error)}]})
            return self._reply(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/main", self.path)
        if not match or match.group(1) not in hub.repos:
            hub.unexpected.append(f"POST {self.path}")
            return self._reply(404, {"error": "Repository not found"})
        repo_id, action = match.groups()
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if repo_id in hub.refuse:
            return self._reply(403, {"error": "You don't have the rights to push to this repository"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        hub.repos[repo_id]["commits"].append(lines[0]["value"]["summary"])
        for line in lines[1:]:
            if line["key"] != "file":
                hub.unexpected.append(f"commit entry {line['key']}")
                continue
            hub.repos[repo_id]["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{'0' * 40}", "commitOid": "0" * 40})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real run folder: two steps of the quickstart recipe on 8 rows, with 4 validation rows."""
    root = tmp_path_factory.mktemp("runs")
    result = finetune("quickstart", output_dir=str(root), log=lambda line: None,
                      **{"train.max_steps": 2, "data.limit": 8, "data.val_limit": 4, "train.progress": "none"})
    return result.run_dir


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with HubStandIn() as server:
        yield server
    hub_unreachable.cache_clear()


# ----------------------------------------------------------------------------- the card


def test_the_card_of_a_real_run_names_base_method_data_metrics_and_command(tiny_run):
    facts = card_facts(tiny_run)
    card = model_card(facts, "alice/quick")
    meta = front_matter(card)
    assert meta == {"library_name": "peft", "license": "apache-2.0", "pipeline_tag": "text-generation",
                    "tags": ["lorakit", "lora", "sft"]}  # 'embedded' is no Hub id: no base_model key
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert "# quick\n\nA `lora` adapter for lorakit's embedded model (`embedded`)" in card
    assert "| r | 16 |" in card and "| targets | all-linear |" in card  # the method and its hyperparameters
    assert "| source | embedded-train |" in card and "| training rows | 8 |" in card
    assert "| validation examples | 4 |" in card
    assert f"| final train loss | {summary['final_loss']:.4g} |" in card
    assert f"| final eval loss | {summary['final_eval_loss']:.4g} |" in card
    assert "| optimizer steps | 2 |" in card
    assert "`lorakit train config.yaml`" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config == {k: v for k, v in read_yaml(tiny_run / "config.yaml").items() if k != "output_dir"}
    assert 'PeftModel.from_pretrained(base, "alice/quick")' in card and 'lorakit.load_model("embedded")' in card
    assert card_facts(tiny_run / "adapter").results == facts.results  # the adapter folder finds its run


def test_the_card_reads_a_quickstart_evaluation_and_names_a_hub_base(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    report = {"base": {"accuracy": {"capital": 0.1}, "contains": 0.2, "qa_loss": 3.5},
              "tuned": {"accuracy": {"capital": 0.75}, "contains": 0.8, "qa_loss": 0.5}}
    (run / "report.json").write_text(json.dumps(report))
    facts = card_facts(run)
    card = model_card(facts, "alice/quick")
    assert "| exact match: capital | 0.1 | 0.75 |" in card and "| loss on held-out answers | 3.5 | 0.5 |" in card
    facts.base_model, facts.license = "HuggingFaceTB/SmolLM2-135M", None
    assert card_metadata(facts)["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    merged = front_matter(model_card(facts, "alice/quick-merged", merged=True))
    assert merged["library_name"] == "transformers" and "merged" in merged["tags"]


# ----------------------------------------------------------------------------- the upload


def test_push_uploads_the_adapter_and_its_card_to_a_loopback_stand_in_for_the_hub(tiny_run, hub, capsys,
                                                                                   monkeypatch):
    assert cli.main(["push", str(tiny_run), "--repo-id", "alice/quick", "--endpoint", hub.url, "--token", TOKEN,
                     "--private"]) == 0
    repo = hub.repos["alice/quick"]
    assert repo["create"] == {"name": "quick", "organization": "alice", "visibility": "private"}
    adapter = tiny_run / "adapter"
    card = model_card(card_facts(tiny_run), "alice/quick").encode()
    expected = {path.name: path.read_bytes() for path in adapter.iterdir()} | {"README.md": card}
    assert set(expected) == {"adapter_config.json", "adapter_model.safetensors", "lorakit_run.json", "README.md"}
    assert repo["files"] == expected  # every file, byte for byte
    assert hub.validated == [card.decode()] and hub.unexpected == []
    assert capsys.readouterr().out.startswith(f"pushed 4 files ({sum(map(len, expected.values())) / 1e6:.2f} MB) "
                                              f"to {hub.url}/alice/quick: {hub.url}/alice/quick/commit/")
    # again, with the endpoint and the token from the environment: the repository exists, the commit updates it
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["push", str(adapter), "--repo-id", "alice/quick"]) == 0
    assert len(repo["commits"]) == 2 and repo["files"] == expected
    assert set(hub.tokens) == {f"Bearer {TOKEN}"}


def test_push_merged_uploads_the_merged_model(tiny_run, hub, tmp_path):
    assert cli.main(["push", str(tiny_run), "--repo-id", "alice/quick-merged", "--merged", "--endpoint", hub.url,
                     "--token", TOKEN]) == 0
    files = hub.repos["alice/quick-merged"]["files"]
    merged = merge_to_folder(tiny_run / "adapter", tmp_path / "merged")
    assert {name: data for name, data in files.items() if name != "README.md"} == \
           {path.name: path.read_bytes() for path in merged.iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    assert front_matter(files["README.md"].decode())["library_name"] == "transformers"


def test_a_dry_run_writes_the_card_and_the_file_list_and_uploads_nothing(tiny_run, hub, tmp_path, capsys):
    out = tmp_path / "dry"
    assert cli.main(["push", str(tiny_run), "--repo-id", "alice/quick", "--endpoint", hub.url, "--token", TOKEN,
                     "--dry-run", "--out", str(out)]) == 0
    assert hub.repos == {} and hub.tokens == []
    assert (out / "README.md").read_text() == model_card(card_facts(tiny_run), "alice/quick")
    listed = [line.split("\t")[0] for line in (out / "files.txt").read_text().splitlines()]
    assert listed == ["adapter_config.json", "adapter_model.safetensors", "lorakit_run.json", "README.md"]
    assert "dry run: nothing uploaded. alice/quick would get 4 files" in capsys.readouterr().out


def test_push_mistakes_and_hub_errors_are_one_line(tiny_run, hub, tmp_path, capsys, monkeypatch):
    def error(*argv: str) -> str:
        assert cli.main(["push", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert error(str(tiny_run)) == "error: lorakit push needs --repo-id USER/NAME: the Hub repository to create or " \
                                   "update\n"
    assert error(str(tiny_run), "--repo-id", "no-owner").startswith("error: --repo-id 'no-owner': expected USER/NAME")
    assert error(str(tmp_path), "--repo-id", "alice/x") == (
        f"error: no adapter found in {tmp_path}: expected a run folder (config.yaml with adapter/ or model/), an "
        "adapter folder (adapter_config.json) or a model folder (config.json)\n")
    hub.refuse.add("alice/quick")
    assert error(str(tiny_run), "--repo-id", "alice/quick", "--endpoint", hub.url, "--token", TOKEN) == (
        f"error: the hub at {hub.url} refused the push to alice/quick (HTTP 403): You don't have the rights to push "
        "to this repository\n")
    assert error(str(tiny_run), "--repo-id", "alice/other", "--endpoint", hub.url, "--token", "wrong").startswith(
        f"error: the hub at {hub.url} refused the push to alice/other (HTTP 401): Invalid credentials")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert error(str(tiny_run), "--repo-id", "alice/quick", "--endpoint", hub.url, "--token", TOKEN).startswith(
        "error: HF_HUB_OFFLINE is set")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert error(str(tiny_run), "--repo-id", "alice/quick", "--endpoint", hub.url).startswith(
        "error: pushing needs a Hub token with write access")
