"""Parses engine command lines with the installed vLLM's own `vllm serve` parser.

Reads a JSON list of command lines (``["vllm", "serve", ...]``) on stdin, as the operator
renders them for engine Pods, and prints one line per command: ``ok`` and what vLLM made of
the flags the operator relies on, or ``refused`` and vLLM's message. The engine itself is not
started (no GPU, no model hub); vLLM's parser is what refuses an unknown or malformed flag.
"""

import json
import sys

from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser


class Refused(Exception):
    pass


class Parser(FlexibleArgumentParser):
    def error(self, message):  # argparse exits; say why instead
        raise Refused(message)


def main() -> int:
    bad = 0
    for argv in json.load(sys.stdin):
        assert argv[:2] == ["vllm", "serve"], argv
        root = Parser(prog="vllm")
        serve = ServeSubcommand()
        serve.subparser_init(root.add_subparsers(dest="subcommand", parser_class=Parser))
        try:
            a = root.parse_args(argv[1:])
            serve.validate(a)
        except (Refused, ValueError, TypeError) as e:
            print(f"refused {' '.join(argv[2:6])}…: {e}")
            bad += 1
            continue
        kv = a.kv_transfer_config
        print("ok", json.dumps({
            "model": getattr(a, "model_tag", None) or a.model,
            "prefix_caching": a.enable_prefix_caching,
            "tensor_parallel_size": a.tensor_parallel_size,
            "kv_connector": getattr(kv, "kv_connector", None),
            "kv_connector_module_path": getattr(kv, "kv_connector_module_path", None),
            "kv_role": getattr(kv, "kv_role", None),
            "kv_load_failure_policy": getattr(kv, "kv_load_failure_policy", None),
        }))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
