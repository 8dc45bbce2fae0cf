"""`parcap registry list | show | explain`, in process and as real commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine.cli
from registry import ModelRegistry
from registry.cli import main
from tests.support.sandbox import BROKEN, DECLARES_NOTHING, SELF_MANAGED, sandbox

ROOT = Path(__file__).resolve().parents[2]
ALL2ALL = ["--tp-size", "4", "--moe-a2a-backend", "all2all"]
__all__ = ["sandbox"]  # the fixture


@pytest.fixture
def models(sandbox):
    return ModelRegistry(
        {
            "PlainForCausalLM": sandbox.module("plain", DECLARES_NOTHING) + ":Model",
            "OwnSpForCausalLM": sandbox.module("own_sp", SELF_MANAGED) + ":Model",
        },
        group=None,
    )


def run(capsys, argv, models):
    try:
        code = main(argv, models=models)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json(capsys, models):
    code, out, err = run(capsys, ["list", "--json"], models)
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert doc["errors"] == []
    assert [m["architecture"] for m in doc["models"]] == ["OwnSpForCausalLM", "PlainForCausalLM"]
    own = doc["models"][0]
    assert set(own) == {"architecture", "declared_by", "capabilities", "origin"}
    assert own["capabilities"] == {"self_managed_sp": True}
    assert own["declared_by"].endswith("own_sp.Base")
    assert doc["models"][1]["declared_by"] == "default"


def test_list_text_table(capsys, models):
    code, out, _ = run(capsys, ["list"], models)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ARCHITECTURE", "CAPABILITIES", "DECLARED_BY", "ORIGIN"]
    assert lines[1].split()[:2] == ["OwnSpForCausalLM", "self_managed_sp=True"]
    assert lines[2].split() == ["PlainForCausalLM", "self_managed_sp=False", "default", "builtin"]


def test_list_reports_errors_and_exits_1(capsys, sandbox):
    models = ModelRegistry(
        {
            "OkForCausalLM": sandbox.module("ok", DECLARES_NOTHING) + ":Model",
            "BadForCausalLM": sandbox.module("bad", BROKEN) + ":Model",
        },
        group=None,
    )
    code, out, _ = run(capsys, ["list", "--json"], models)
    assert code == 1
    doc = json.loads(out)
    assert [m["architecture"] for m in doc["models"]] == ["OkForCausalLM"]
    [e] = doc["errors"]
    assert e["architecture"] == "BadForCausalLM" and "plugin exploded on import" in e["error"]
    code, out, _ = run(capsys, ["list"], models)
    assert code == 1
    assert "FAILED" in out and "BadForCausalLM" in out and "plugin exploded" in out


def test_show(capsys, models):
    code, out, _ = run(capsys, ["show", "OwnSpForCausalLM", "--json"], models)
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"architecture", "class", "declared_by", "capabilities", "origin"}
    assert doc["class"].endswith("own_sp:Model") and doc["origin"] == "builtin"
    code, out, _ = run(capsys, ["show", "OwnSpForCausalLM"], models)
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["architecture"] == "OwnSpForCausalLM"
    assert rows["self_managed_sp"] == "True"
    assert rows["declared_by"].endswith("own_sp.Base")


def test_explain_json_shape(capsys, models):
    code, out, _ = run(capsys, ["explain", "OwnSpForCausalLM", *ALL2ALL, "--json"], models)
    assert code == 0
    doc = json.loads(out)
    assert list(doc) == ["architecture", "declared_by", "capabilities", "plan"]
    assert list(doc["plan"]) == [
        "attn_tp_gather",
        "shard_local_token_count",
        "mlp_tp_gather",
        "gathered_buffer",
        "mlp_sync",
        "token_alignment",
    ]
    assert doc["plan"]["attn_tp_gather"]["source"] == "model"
    assert doc["plan"]["token_alignment"]["value"] == 1


def test_explain_text(capsys, models):
    code, out, _ = run(capsys, ["explain", "PlainForCausalLM", *ALL2ALL], models)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.strip()}
    assert rows["attn_tp_gather"] == ["True", "server_args"]
    assert rows["gathered_buffer"] == ["True", "server_args"]
    assert rows["mlp_tp_gather"] == ["False", "server_args"]
    assert rows["token_alignment"][0] == "4"
    assert "tp_size=4" in out and "moe_a2a_backend=all2all" in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["explain", "PlainForCausalLM", *ALL2ALL, "--disable-attn-tp-gather"],
            ["--attn-tp-gather off", "refused", "PlainForCausalLM"],
        ),
        (["explain", "PlainForCausalLM", "--attn-tp-gather", "on"], ["nothing to gather"]),
        (
            ["explain", "NopeForCausalLM"],
            ["unknown architecture 'NopeForCausalLM'", "OwnSpForCausalLM, PlainForCausalLM"],
        ),
        (["show", "NopeForCausalLM"], ["unknown architecture", "PlainForCausalLM"]),
        (
            ["explain", "PlainForCausalLM", "--tp-size", "4", "--dp-size", "3"],
            ["'dp_size' must divide 'tp_size'"],
        ),
        (["explain", "PlainForCausalLM", "--moe-a2a-backend", "deepep"], ["invalid choice"]),
        (
            ["explain", "PlainForCausalLM", "--attn-tp-gather", "on", "--disable-attn-tp-gather"],
            ["not allowed with --attn-tp-gather on"],
        ),
        (["frobnicate"], ["invalid choice"]),
        ([], ["required"]),
    ],
)
def test_user_mistakes_exit_2_with_one_line(capsys, models, argv, words):
    code, out, err = run(capsys, argv, models)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("parcap: error: ")
    for w in words:
        assert w in err


def test_load_failure_of_one_model_exits_1(capsys, sandbox):
    models = ModelRegistry({"BadForCausalLM": sandbox.module("bad", BROKEN) + ":Model"}, group=None)
    code, _, err = run(capsys, ["explain", "BadForCausalLM"], models)
    assert code == 1
    assert err.startswith("parcap: error: model 'BadForCausalLM'") and "exploded" in err


def test_parcap_dispatcher_forwards_to_registry(capsys, models, monkeypatch):
    monkeypatch.setattr("registry.models._default", models)
    assert engine.cli.main(["registry", "explain", "OwnSpForCausalLM", *ALL2ALL, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["attn_tp_gather"]["source"] == "model"
    with pytest.raises(SystemExit) as e:
        engine.cli.main(["nonsense"])
    assert e.value.code == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
    assert engine.cli.main(["--help"]) == 0
    assert "registry" in capsys.readouterr().out


# -- real processes: the "done when" through plugins on PYTHONPATH --------------


def command(args, plugin_dir, entry=("-m", "registry")):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)])}
    return subprocess.run(
        [sys.executable, *entry, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def plugins(sandbox):
    sandbox.dist(
        "parcap-own-sp", {"OwnSpForCausalLM": sandbox.module("own", SELF_MANAGED) + ":Model"}
    )
    sandbox.dist(
        "parcap-plain", {"PlainForCausalLM": sandbox.module("plain", DECLARES_NOTHING) + ":Model"}
    )
    sandbox.dist(
        "parcap-broken", {"BrokenForCausalLM": sandbox.module("broken", BROKEN) + ":Model"}
    )
    sandbox.dist(
        "parcap-dup", {"LlamaForCausalLM": sandbox.module("dup", DECLARES_NOTHING) + ":Model"}
    )
    return sandbox.root


@pytest.mark.parametrize("entry", [("-m", "registry"), ("-m", "engine.cli", "registry")])
def test_done_when(plugins, entry):
    r = command(["explain", "OwnSpForCausalLM", *ALL2ALL, "--json"], plugins, entry)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert plan["attn_tp_gather"]["value"] is False
    assert plan["attn_tp_gather"]["source"] == "model"
    assert plan["gathered_buffer"]["value"] is False
    assert plan["mlp_sync"]["value"] is False

    r = command(["explain", "PlainForCausalLM", *ALL2ALL, "--json"], plugins, entry)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["declared_by"] == "default"
    plan = doc["plan"]
    assert (plan["attn_tp_gather"]["value"], plan["attn_tp_gather"]["source"]) == (
        True,
        "server_args",
    )
    assert plan["gathered_buffer"]["value"] is True and plan["mlp_sync"]["value"] is True

    r = command(
        ["explain", "PlainForCausalLM", *ALL2ALL, "--disable-attn-tp-gather", "--json"],
        plugins,
        entry,
    )
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("parcap: error: ")
    assert "Traceback" not in r.stderr


def test_list_process_reports_plugins_and_errors(plugins):
    r = command(["list", "--json"], plugins)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    origins = {m["architecture"]: m["origin"] for m in doc["models"]}
    assert origins["OwnSpForCausalLM"] == "plugin:parcap-own-sp"
    assert origins["PlainForCausalLM"] == "plugin:parcap-plain"
    errors = {}
    for e in doc["errors"]:
        errors.setdefault(e["architecture"], []).append(e["error"])
    assert any("plugin exploded on import" in e for e in errors["BrokenForCausalLM"])
    assert any(
        "builtin (models.llama:LlamaForCausalLM)" in e and "plugin:parcap-dup" in e
        for e in errors["LlamaForCausalLM"]
    )


def test_registry_imports_no_torch_engine_or_models(plugins):
    code = (
        "import sys, registry, registry.cli\n"
        "registry.cli.main(['explain', 'OwnSpForCausalLM', '--json'])\n"
        "bad = [m for m in ('torch', 'engine', 'models') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = command(["-c", code], plugins, entry=())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["capabilities"] == {"self_managed_sp": True}
