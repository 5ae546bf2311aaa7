"""The arclight command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from lightning_core import tracing
from lightning_core.store.catalog import Catalog
from tests.conftest import REPO


def _arclight(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_core", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _lake_with_spans(tmp_path):
    lake = tmp_path / "lake"
    handle = tracing.init_tracing(lake=lake, context=tracing.RolloutContext(run_id="cli", epoch=1), set_global=False)
    with tracing.agent("a"):
        tracing.emit_reward(0.25)
    handle.flush()
    Catalog(lake).ensure()
    return lake


def test_query_prints_json_csv_and_table(tmp_path):
    lake = _lake_with_spans(tmp_path)
    sql = "SELECT name, reward_value FROM spans WHERE run_id = 'cli' ORDER BY name"
    out = _arclight("query", "--lake", str(lake), "--format", "json", sql)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"name": "agent a", "reward_value": None},
        {"name": "reward primary", "reward_value": 0.25},
    ]
    csv = _arclight("query", "--lake", str(lake), "--format", "csv", sql)
    assert csv.stdout.splitlines()[0].replace('"', "") == "name,reward_value"
    table = _arclight("query", "--lake", str(lake), sql)
    assert "reward primary" in table.stdout and "2 row(s)" in table.stderr


def test_query_is_read_only_and_reports_sql_errors(tmp_path):
    lake = _lake_with_spans(tmp_path)
    out = _arclight("query", "--lake", str(lake), "CREATE TABLE t (x INT)")
    assert out.returncode == 1 and "read-only" in out.stderr.lower()
    out = _arclight("query", "--lake", str(lake), "SELECT nope FROM spans")
    assert out.returncode == 1 and "nope" in out.stderr


def test_shell_runs_statements_read_only(tmp_path):
    lake = _lake_with_spans(tmp_path)
    export = tmp_path / "export.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_core", "shell", "--lake", str(lake)],
        input=(f"COPY (SELECT * FROM spans) TO '{export}';\n"  # writes: each refused, and the shell goes on
               "CREATE TABLE t AS SELECT 1 AS x;\n"
               "SELECT count(*) AS tables_made FROM duckdb_tables() WHERE table_name = 't';\n"
               "SELECT count(*) AS n\nFROM spans WHERE run_id = 'cli';\n.quit\n"),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "read-only here: COPY statements are refused" in proc.stderr, proc.stderr
    assert "read-only here: CREATE statements are refused" in proc.stderr, proc.stderr
    assert not export.exists()  # nothing written outside the lake ...
    made, spans = proc.stdout.split("tables_made")[1].split("┃ n ┃")
    assert "│ 0 " in made and "│ 2 │" in spans, proc.stdout  # ... nor a table inside it; the spans as before


def test_config_errors_exit_2_without_a_traceback(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("lake:\n  pth: x\n")
    out = _arclight("query", "--config", str(bad), "SELECT 1")
    assert out.returncode == 2
    assert "unknown key 'lake.pth'" in out.stderr and "Traceback" not in out.stderr


def test_demo_traces_rollouts_through_a_real_collector(tmp_path):
    out = _arclight("demo", "--rollouts", "4", "--set", f"project_dir={tmp_path}", "--set", "collector.port=0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with Catalog(tmp_path / ".arclight" / "lake").read() as con:
        counts = con.execute("SELECT count(DISTINCT rollout_id), count(*) FROM spans WHERE run_id='default'").fetchall()
    assert counts == [(4, 4 * 6)]  # planner, user message, executor, tool, answer, reward


def test_token_and_host_options_are_taken_literally(tmp_path):
    # fails before: --token 'Xy9 #long-secret-part' was parsed as YAML and became 'Xy9' (the rest a
    # comment), and --host :: became the mapping {':': None} (a confusing config error)
    import httpx

    from lightning_core.common.services import free_port, wait_healthy, Service

    port, token = free_port(), "Xy9 #long-secret-part"
    proc = subprocess.Popen([sys.executable, "-m", "lightning_core", "collector", "--lake", str(tmp_path / "lake"),
                             "--port", str(port), "--token", token, "--log-level", "warning"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    service = Service("collector", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/healthz", process=proc)
    try:
        wait_healthy(service, timeout_s=60)
        url = f"{service.url}/v1/traces"
        headers = {"Content-Type": "application/json"}
        assert httpx.post(url, content=b"{}", headers={**headers, "Authorization": "Bearer Xy9"}).status_code == 401
        assert httpx.post(url, content=b"{}", headers={**headers, "Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        service.stop()
    out = _arclight("collector", "--lake", str(tmp_path / "lake"), "--host", "::", "--port", "0")
    assert out.returncode == 2 and "'::' (not loopback) needs a bearer token" in out.stderr


def _one_or_two_lines(out: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2 and "Traceback" not in out.stderr, out.stderr
    assert all(needle in out.stderr for needle in needles), out.stderr


def test_a_lake_that_cannot_be_written_is_one_line_naming_the_path(tmp_path):
    # fails before: 36-75-line tracebacks (NotADirectoryError) from collector, query, triplets, compact
    (tmp_path / "afile").write_text("x")
    out = _arclight("collector", "--lake", str(tmp_path / "afile" / "lake"), "--port", "0")
    assert out.returncode == 1
    _one_or_two_lines(out, str(tmp_path / "afile" / "lake"), "Not a directory")
    broken = tmp_path / "broken"
    (broken / "spans").mkdir(parents=True)
    (broken / "spans" / "training").write_text("a file where a folder belongs")
    (broken / "llm_calls").write_text("a file where a folder belongs")
    for args in (["query", "SELECT 1"], ["triplets"], ["compact"]):
        out = _arclight(*args, "--lake", str(broken))
        assert out.returncode == 1, (args, out.stderr)
        _one_or_two_lines(out, str(broken), "Not a directory")


def test_query_on_a_lake_that_does_not_exist_says_so_and_creates_nothing(tmp_path):
    # fails before: a typo in --lake silently created a new empty lake and answered from it
    for args in (["query", "SELECT 1"], ["shell"], ["triplets"], ["compact"]):
        out = _arclight(*args, "--lake", str(tmp_path / "typo"))
        assert out.returncode == 2, (args, out.stderr)
        _one_or_two_lines(out, "no lake at", str(tmp_path / "typo"), "does not exist")
    assert not (tmp_path / "typo").exists()


def test_query_csv_writes_list_columns_as_json(tmp_path):
    # fails before: ArrowInvalid traceback (CSV has no list type)
    lake = _lake_with_spans(tmp_path)
    out = _arclight("query", "--lake", str(lake), "--format", "csv", "SELECT [1, 2] AS ids, {'a': 'x'} AS s, 'n' AS name")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1] == '"[1, 2]","{""a"": ""x""}","n"'


def test_invalid_yaml_is_one_line_with_the_place(tmp_path):
    # fails before: 8 lines of PyYAML's report
    bad = tmp_path / "c.yaml"
    bad.write_text("name: a\nlake: [unclosed\n  path: x\n")
    out = _arclight("query", "--config", str(bad), "SELECT 1")
    assert out.returncode == 2
    _one_or_two_lines(out, f"{bad}: not valid YAML at line 3, column 7")


def test_a_bad_regex_is_shown_with_its_brackets(tmp_path):
    # fails before: "agent_match '' is not a valid regular expression" (Rich took [z-a] as markup)
    lake = _lake_with_spans(tmp_path)
    out = _arclight("triplets", "--lake", str(lake), "--agent-match", "[z-a]")
    assert out.returncode == 2
    _one_or_two_lines(out, "--agent-match '[z-a]' is not a valid regular expression")


def test_query_refuses_statements_that_write_files(tmp_path):
    # fails before: COPY ... TO wrote the file although `arclight query` is documented read-only
    lake = _lake_with_spans(tmp_path)
    for sql in (f"COPY (SELECT * FROM spans) TO '{tmp_path / 'out.csv'}'",
                f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'",
                f"EXPORT DATABASE '{tmp_path / 'export'}'",
                f"ATTACH '{tmp_path / 'other.duckdb'}' AS other",
                f"SELECT 1; COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'"):
        out = _arclight("query", "--lake", str(lake), sql)
        assert out.returncode == 1 and "read-only" in out.stderr, (sql, out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lake"]
    for sql in ("EXPLAIN SELECT count(*) FROM spans", "DESCRIBE spans", "SHOW TABLES",
                "WITH x AS (SELECT 1 AS a) SELECT a FROM x", "FROM spans SELECT count(*)"):
        assert _arclight("query", "--lake", str(lake), sql).returncode == 0, sql


SECRETS = {"gateway.token": "SECRET-gw-4f1c", "collector.token": "SECRET-col-9a2e"}


def test_tokens_and_storage_keys_given_on_the_command_line_stay_out_of_the_project_log(tmp_path):
    """The project log is the file an error asks the user to share: the command line it records hides every value of
    a token, a key or the storage options (docs/scaling.md passes the tokens as --set)."""
    from lightning_core.common.logs import log_path
    from lightning_core.common.services import free_port

    config = tmp_path / "config.yaml"
    config.write_text("name: leak\n")
    storage = json.dumps({"AWS_SECRET_ACCESS_KEY": "SECRET-aws-77d0", "AWS_REGION": "eu-west-1"})
    out = _arclight("up", str(config), *[a for key, value in SECRETS.items() for a in ("--set", f"{key}={value}")],
                    "--set", f"lake.storage_options={storage}", "--set", "serving.env={HF_TOKEN: SECRET-hf-0b3a}",
                    "--set", f"collector.endpoint=http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert out.returncode == 1 and "collector.endpoint" in out.stderr, out.stderr  # it stops before starting anything
    logged = log_path(tmp_path).read_text()
    line = next(line for line in logged.splitlines() if "arclight.cli: arclight up" in line)
    assert "SECRET-" not in logged, line
    assert "--set gateway.token=*** --set collector.token=***" in line and "--set lake.storage_options=***" in line
    assert "HF_TOKEN" in line and "collector.endpoint=http://127.0.0.1:" in line  # what is no secret stays readable


def test_redaction_hides_secret_options_and_settings_and_keeps_the_rest():
    from lightning_core.common.redact import redacted_argv

    argv = ["gateway", "--token", "T1", "--api-key=T2", "--set=collector.token=T3", "--set", "trainer.max_tokens=64",
            "--set", "pipeline.missing_token_ids=fail", "--set", "rollouts.command_env={OPENAI_API_KEY: T4, MODE: x}",
            "--set", "serving.weights_storage_options.AWS_ENDPOINT_URL=T5", "--port", "8400"]
    assert redacted_argv(argv) == [
        "gateway", "--token", "***", "--api-key=***", "--set=collector.token=***", "--set", "trainer.max_tokens=64",
        "--set", "pipeline.missing_token_ids=fail", "--set", 'rollouts.command_env={"OPENAI_API_KEY": "***", "MODE": "x"}',
        "--set", "serving.weights_storage_options.AWS_ENDPOINT_URL=***", "--port", "8400"]


def test_a_flow_gets_back_the_secrets_its_command_kept_out_of_its_parameters_and_refuses_one_no_command_holds():
    """A command gives its flow the --set overrides with secrets hidden (Prefect records a run's parameters); the flow,
    in the same process, gets the values back. A run Prefect started again from its parameters has only ``***``: it
    stops and says which setting, instead of using ``***`` as a token."""
    import pytest

    from lightning_core.common.redact import given_back, held_back
    from lightning_core.config import ConfigError

    meant = ["gateway.token=SECRET-gw-1", 'serving.env={"HF_TOKEN": "SECRET-hf-2", "MODE": "x"}', "epochs=3"]
    with held_back(meant) as shown:
        assert shown == ["gateway.token=***", 'serving.env={"HF_TOKEN": "***", "MODE": "x"}', "epochs=3"]
        assert given_back(shown) == meant
    assert given_back(["epochs=3"]) == ["epochs=3"]
    with pytest.raises(ConfigError, match=r"^gateway.token, serving.env: this flow run was given the value of a secret"):
        given_back(shown)


def test_a_started_collector_reads_its_storage_options_without_them_on_its_command_line(tmp_path, s3):
    """``ps`` shows every user a process's command line: the storage options (S3 keys) and the token reach the
    collector some other way, and it still writes its spans to object storage with them."""
    from lightning_core.ingest.service import start_collector
    from tests.conftest import make_config

    options = {"AWS_ENDPOINT_URL": s3, "AWS_ALLOW_HTTP": "true", "conditional_put": "etag",
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "SECRET-s3-5e61"}
    # no catalog made here: the collector records where its spans go from the options it was given
    cfg = make_config(tmp_path, "lake.spans_uri=s3://arclight/cmdline/spans", f"lake.storage_options={json.dumps(options)}",
                      f"collector.token={SECRETS['collector.token']}")
    service = start_collector(cfg, log_dir=tmp_path)
    try:
        cmdline = open(f"/proc/{service.process.pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        assert "lightning_core collector" in cmdline and "lake.spans_uri=s3://arclight/cmdline/spans" in cmdline
        assert "SECRET-" not in cmdline and s3 not in cmdline, cmdline
        handle = tracing.init_tracing(endpoint=service.url, token=SECRETS["collector.token"], set_global=False,
                                      context=tracing.RolloutContext(run_id="cmdline", epoch=0))
        with tracing.agent("a"):
            tracing.emit_reward(1.0)
        handle.flush()
        with Catalog.from_config(cfg).read() as con:
            rows = con.execute("SELECT name FROM spans WHERE run_id = 'cmdline' ORDER BY name").fetchall()
        assert rows == [("agent a",), ("reward primary",)]
    finally:
        service.stop()
