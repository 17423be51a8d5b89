"""Hub in and out without the network: `prefalign export RUN OUT --push-to-hub REPO` and `train.push_to_hub`
talk to a local stand-in of the Hub's HTTP API (127.0.0.1, a thread of this process) that keeps what it is
sent; the model card carries the hub's metadata (`huggingface_hub.ModelCard`)."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import run_in
from prefalign.core.report import card_data, model_card


class StandIn(BaseHTTPRequestHandler):
    """The four calls `create_repo` + `upload_folder` make: create, validate-yaml, preupload (every file
    'regular', so it travels inline), commit (NDJSON; files base64). `server.repos[repo] = {path: bytes}`."""

    def _reply(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server, base = self.server, f"http://127.0.0.1:{self.server.server_port}"
        server.calls.append(self.path)
        if self.headers.get("Authorization") != "Bearer hf_standin":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request.get('organization')}/{request['name']}"
            server.repos.setdefault(repo, {})
            server.private[repo] = request.get("private", request.get("visibility") == "private")
            return self._reply(200, {"url": f"{base}/{repo}"})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    server.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._reply(404, {"error": f"not in the stand-in: {self.path}"})

    def do_GET(self):  # huggingface_hub < 1.0 asks whether the repository uses xet storage first
        self.server.calls.append(self.path)
        if "/revision/" in self.path:
            return self._reply(
                200,
                {
                    "id": self.path.split("/api/models/")[1].split("/revision/")[0],
                    "sha": "a" * 40,
                    "xetEnabled": False,
                },
            )
        return self._reply(404, {"error": f"not in the stand-in: {self.path}"})

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.repos, server.private, server.calls = {}, {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    yield server
    server.shutdown()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_metadata_names_base_datasets_library_tags_and_license(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B", "lora": {"enabled": True, "r": 8}},
        "loss": {"name": "ipo"},
        "data": {
            "train": ["hf://owner/prefs", {"path": str(tmp_path / "local.jsonl")}],
            "eval": "org/held-out",
        },
    }
    (tmp_path / "local.jsonl").write_text("")
    card = model_card(cfg, {"steps": 3}, folder, license="apache-2.0")
    assert front_matter(card) == {
        "base_model": "Qwen/Qwen2.5-0.5B",
        "datasets": ["org/held-out", "owner/prefs"],
        "library_name": "peft",
        "license": "apache-2.0",
        "tags": ["prefalign", "dpo", "ipo"],
    }
    assert "| loss | `ipo` |" in card
    world = card_data({"method": "sspo", "model": {"name_or_path": "world:digits"}}, folder)
    assert world.base_model is None and world.license is None  # a prefalign world is no hub id


def test_export_pushes_the_exported_folder_byte_for_byte(tmp_path, tiny_lm, pairs_file, hub):
    config = tmp_path / "c.yaml"
    data = pairs_file(tmp_path / "p.jsonl", 12)
    config.write_text(
        yaml.safe_dump(
            {
                "method": "dpo",
                "model": {"name_or_path": str(tiny_lm)},
                "data": {"train": str(data), "max_length": 24, "max_prompt_length": 8},
                "train": {
                    "output_dir": str(tmp_path / "run"),
                    "max_steps": 2,
                    "batch_size": 2,
                    "progress": False,
                },
            }
        )
    )
    result = run_in(tmp_path, ["prefalign", "train", str(config)])
    assert result.exit_code == 0, result.output
    result = run_in(
        tmp_path, ["prefalign", "export", str(tmp_path / "run"), str(tmp_path / "out"), "--push-to-hub", "me/tiny-dpo",
                   "--license", "mit"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pushed to me/tiny-dpo" in result.output and hub.private["me/tiny-dpo"] is True
    exported = {
        p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    }
    assert hub.repos["me/tiny-dpo"] == exported and "model.safetensors" in exported
    assert front_matter(exported["README.md"].decode())["license"] == "mit"


def test_train_push_to_hub_and_a_refused_push_is_one_error_line(
    tmp_path, tiny_lm, pairs_file, hub, monkeypatch
):
    data = pairs_file(tmp_path / "p.jsonl", 12)
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(tiny_lm)},
        "data": {"train": str(data), "max_length": 24, "max_prompt_length": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2, "progress": False,
                  "push_to_hub": "me/run", "hub_private": False},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert run_in(tmp_path, ["prefalign", "train", str(tmp_path / "c.yaml")]).exit_code == 0
    assert hub.private["me/run"] is False and "README.md" in hub.repos["me/run"]
    assert (
        Path(tmp_path / "run" / "hub" / "model.safetensors").read_bytes()
        == hub.repos["me/run"]["model.safetensors"]
    )
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    result = run_in(
        tmp_path,
        ["prefalign", "export", str(tmp_path / "run"), str(tmp_path / "o2"), "--push-to-hub", "me/x"],
    )
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "error: push to me/x failed:" in result.output and "401" in result.output
