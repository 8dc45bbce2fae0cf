"""ServerArgs: flags built from the fields, the alias, and every invalid combination."""

import argparse

import attrs
import pytest

from engine.server_args import ServerArgs
from registry import ParallelCapabilities, PlanArgs, UsageError, resolve_plan
from registry.args import Parser, flag_name


def parse_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        ServerArgs.from_cli(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("parcap: error: ")
    return err


def test_defaults_come_from_the_class():
    args = ServerArgs.from_cli([])
    assert args == ServerArgs()
    assert (args.tp_size, args.dp_size, args.attn_tp_gather, args.moe_dense_tp_size) == (
        1,
        1,
        "auto",
        None,
    )
    assert (args.device, args.dtype, args.seed, args.cuda_graph_max_bs) == ("cpu", "auto", 0, 32)
    assert (args.max_total_tokens, args.dist_timeout, args.dist_init_addr) == (8192, 60, None)


def test_every_field_is_a_flag_and_every_flag_a_field():
    parser = Parser()
    ServerArgs.add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    fields = {flag_name(f.name) for f in attrs.fields(ServerArgs)}
    assert flags == fields | {"--disable-attn-tp-gather"}
    for name in (
        "--tp-size",
        "--dp-size",
        "--enable-dp-attention",
        "--moe-a2a-backend",
        "--moe-dense-tp-size",
        "--enable-dp-lm-head",
        "--attn-tp-gather",
        "--device",
        "--dtype",
        "--seed",
        "--cuda-graph-max-bs",
        "--disable-cuda-graph",
    ):
        assert name in flags


def test_all_flags_parse():
    argv = (
        "--tp-size 8 --dp-size 2 --enable-dp-attention --moe-a2a-backend all2all "
        "--moe-dense-tp-size 1 --enable-dp-lm-head --attn-tp-gather on "
        "--model LlamaForCausalLM --device cuda --dtype float16 --seed 7 "
        "--cuda-graph-max-bs 16 --disable-cuda-graph --max-running-requests 3 "
        "--max-total-tokens 100 --max-prefill-tokens 50 --dist-timeout 9 "
        "--dist-init-addr 10.0.0.1:2345"
    )
    args = ServerArgs.from_cli(argv.split())
    assert args == ServerArgs(
        tp_size=8,
        dp_size=2,
        enable_dp_attention=True,
        moe_a2a_backend="all2all",
        moe_dense_tp_size=1,
        enable_dp_lm_head=True,
        attn_tp_gather="on",
        model="LlamaForCausalLM",
        device="cuda",
        dtype="float16",
        seed=7,
        cuda_graph_max_bs=16,
        disable_cuda_graph=True,
        max_running_requests=3,
        max_total_tokens=100,
        max_prefill_tokens=50,
        dist_timeout=9,
        dist_init_addr="10.0.0.1:2345",
    )
    assert isinstance(args.moe_dense_tp_size, int)


def test_disable_attn_tp_gather_is_an_alias_of_off(capsys):
    assert ServerArgs.from_cli(["--disable-attn-tp-gather"]).attn_tp_gather == "off"
    assert (
        ServerArgs.from_cli(["--attn-tp-gather", "off", "--disable-attn-tp-gather"]).attn_tp_gather
        == "off"
    )
    for mode in ("on", "auto"):
        for argv in (
            ["--attn-tp-gather", mode, "--disable-attn-tp-gather"],
            ["--disable-attn-tp-gather", "--attn-tp-gather", mode],
        ):
            err = parse_error(capsys, argv)
            assert f"--disable-attn-tp-gather: not allowed with --attn-tp-gather {mode}" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["--tp-size", "4", "--dp-size", "3"],
            "'dp_size' must divide 'tp_size' (got tp_size=4, dp_size=3)",
        ),
        (
            ["--tp-size", "2", "--enable-dp-attention"],
            "'enable_dp_attention' needs 'dp_size' > 1 (got dp_size=1)",
        ),
        (["--enable-dp-lm-head"], "'enable_dp_lm_head' needs 'enable_dp_attention'"),
        (
            ["--tp-size", "4", "--dp-size", "2", "--enable-dp-lm-head"],
            "'enable_dp_lm_head' needs 'enable_dp_attention'",
        ),
        (["--moe-dense-tp-size", "2"], "argument --moe-dense-tp-size: invalid choice: 2"),
        (["--moe-a2a-backend", "deepep"], "argument --moe-a2a-backend: invalid choice: 'deepep'"),
        (["--attn-tp-gather", "maybe"], "argument --attn-tp-gather: invalid choice"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--dtype", "int8"], "argument --dtype: invalid choice"),
        (["--tp-size", "0"], "'tp_size' must be an int >= 1 (got 0)"),
        (["--dp-size", "0"], "'dp_size' must be an int >= 1 (got 0)"),
        (["--cuda-graph-max-bs", "0"], "'cuda_graph_max_bs' must be an int >= 1"),
        (["--max-running-requests", "0"], "'max_running_requests' must be an int >= 1"),
        (["--max-total-tokens", "-5"], "'max_total_tokens' must be an int >= 1"),
        (["--max-prefill-tokens", "0"], "'max_prefill_tokens' must be an int >= 1"),
        (["--dist-timeout", "0"], "'dist_timeout' must be an int >= 1"),
        (["--seed", "-1"], "'seed' must be an int >= 0"),
        (["--tp-size", "two"], "argument --tp-size: invalid int value: 'two'"),
        (["--model", "A", "--model-path", "/x"], "give one of 'model' or 'model_path'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_invalid_combinations_exit_2_with_one_line(capsys, argv, words):
    assert words in parse_error(capsys, argv)


@pytest.mark.parametrize(
    "kw",
    [
        {"tp_size": 4, "dp_size": 3},
        {"enable_dp_attention": True},
        {"enable_dp_lm_head": True},
        {"moe_dense_tp_size": 2},
        {"moe_a2a_backend": "deepep"},
        {"tp_size": 0},
        {"tp_size": "4"},
        {"enable_dp_attention": 1, "dp_size": 2, "tp_size": 2},
        {"device": "tpu"},
        {"max_total_tokens": 0},
        {"model": 3},
    ],
)
def test_programmatic_construction_is_validated_too(kw):
    with pytest.raises((ValueError, TypeError), match="'"):
        ServerArgs(**kw)


def test_require_model(capsys):
    assert ServerArgs(model="LlamaForCausalLM").require_model().model == "LlamaForCausalLM"
    assert ServerArgs(model_path="/ckpt").require_model().model_path == "/ckpt"
    with pytest.raises(SystemExit) as e:
        ServerArgs().require_model()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "parcap: error: one of --model ARCH or --model-path DIR is required\n"


def test_resolved_dtype():
    assert ServerArgs().resolved_dtype == "float32"
    assert ServerArgs(device="cuda").resolved_dtype == "bfloat16"
    assert ServerArgs(device="cuda", dtype="float16").resolved_dtype == "float16"
    assert ServerArgs(dtype="bfloat16").resolved_dtype == "bfloat16"


def test_other_commands_add_the_flags_to_their_own_parser(capsys):
    parser = Parser(prog="parcap generate")
    ServerArgs.add_arguments(parser.add_argument_group("server args"))
    parser.add_argument("--prompt", action="append")
    parser.add_argument("--port", type=int, default=30000)
    ns = parser.parse_args(
        ["--prompt", "hi", "--tp-size", "2", "--model", "M", "--disable-attn-tp-gather"]
    )
    args = ServerArgs.from_namespace(ns, parser).require_model(parser)
    assert (args.tp_size, args.model, args.attn_tp_gather) == (2, "M", "off")
    assert (ns.prompt, ns.port) == (["hi"], 30000)

    ns = parser.parse_args(["--tp-size", "4", "--dp-size", "3"])
    with pytest.raises(UsageError, match="'dp_size' must divide"):
        ServerArgs.from_namespace(ns)
    with pytest.raises(SystemExit):
        ServerArgs.from_namespace(ns, parser)
    assert capsys.readouterr().err.startswith("parcap: error: 'dp_size' must divide")
    with pytest.raises(SystemExit):
        ServerArgs.from_namespace(parser.parse_args([]), parser).require_model(parser)


def test_plain_argparse_parser_works_too():
    parser = argparse.ArgumentParser()
    ServerArgs.add_arguments(parser)
    ns = parser.parse_args(["--tp-size", "2"])
    assert ServerArgs.from_namespace(ns).tp_size == 2


def test_server_args_feed_the_plan_and_are_frozen():
    args = ServerArgs.from_cli(["--tp-size", "4", "--moe-a2a-backend", "all2all"])
    assert isinstance(args, PlanArgs)
    assert (args.attn_tp_size, args.attn_dp_size) == (4, 1)
    assert resolve_plan(ParallelCapabilities(), args).token_alignment == 4
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        args.tp_size = 2
    assert PlanArgs.from_cli(["--tp-size", "2"]) == PlanArgs(tp_size=2)
