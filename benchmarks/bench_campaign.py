"""Whole processes on a realistic campaign: ``sluice run CAMPAIGN`` against what a user runs instead.

::

    .venv/bin/python -m benchmarks.bench_campaign [--recipients 200000] [--rounds 3]
        [--providers aliyun,submail,nxcloud] [--max-wait-quiet 30] [--no-pin] [--workdir DIR]

The list (written once, deterministic): ``id,phone,name,code``; ``id`` the key column
(``u00000001``…, every 100th row repeats an earlier id: 1 % duplicate keys, which sluice
rejects and the peers skip); ``phone`` a distinct mainland mobile number over 26 real
prefixes; ``name`` a Chinese name of 2–4 CJK characters (a common surname and one to three
given-name characters); ``code`` six digits. Per provider, every client runs as a fresh
process pinned to core 0 (the responder on the last core), timed from spawn to exit:

* ``aliyun``: ``sluice run`` (SendBatchSms, V3, params ``name`` and ``code``) against the
  official SDK (``alibabacloud-dysmsapi20170525``, 32 threads) and aiohttp + Semaphore(64);
* ``submail``: ``sluice run`` (``multixsend``, md5 signing, vars ``name`` and ``code``)
  against aiohttp + Semaphore(64);
* ``nxcloud``: ``sluice run`` (``multi/mt``, Chinese content with ``{name}`` and ``{code}``)
  against aiohttp + Semaphore(64).

The peers read the CSV with ``csv.reader`` into memory and skip repeated ids with a set (the
least a script sending a file must do); they keep no ledger and check no number. aiohttp
signs with sluice's own provider modules (``build_request``), as ``benchmarks.peers`` does.
Batches of 100, 64 requests in flight, 100 000 requests/s allowed.

Per run: recipients/s and CPU µs per recipient of the whole process (``wait4``'s rusage:
user + sys of every thread, imports and exit included), peak RSS, time from spawn to the
first request the responder sees, and the client's CPU at that moment (the responder reads
``/proc/PID/stat`` when the first request arrives; 10 ms resolution). Medians over rounds
(the clients' order rotates each round) and the per-round sluice/peer ratios, measured back
to back, with their median. Every run must deliver: the responder must count exactly the
distinct recipients, or the benchmark fails. Figures to ``benchmarks/results/campaign.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    SIGN_NAME,
    TEMPLATE_CODE,
    BenchError,
    ForeignLoad,
    Responder,
    child_result,
    compile_bytecode,
    machine_info,
    markdown_table,
    median,
    responder,
    wait_quiet,
    write_json,
)

__all__ = ("CLIENTS", "main", "read_recipients", "write_realistic_csv")

PROVIDERS = ("aliyun", "submail", "nxcloud")
CLIENTS: dict[str, tuple[str, ...]] = {
    "aliyun": ("sluice", "sdk", "aiohttp"),
    "submail": ("sluice", "aiohttp"),
    "nxcloud": ("sluice", "aiohttp"),
}
LABELS = {
    "sluice": "`sluice run` (whole process)",
    "sdk": "official SDK (32 threads, whole process)",
    "aiohttp": "aiohttp + Semaphore(64) (whole process)",
}
BATCH = 100
CONCURRENCY = 64
NX_CONTENT = "尊敬的{name}，您的验证码是{code}，5分钟内有效，请勿泄露。"
SUBMAIL_PROJECT = "bench1"
ENV = {
    "ALIYUN_ACCESS_KEY_ID": "testid",
    "ALIYUN_ACCESS_KEY_SECRET": "testsecret",
    "SUBMAIL_APPID": "10001",
    "SUBMAIL_APPKEY": "submail-bench-key",
    "NXCLOUD_ACCESS_KEY": "nxbenchkey",
    "NXCLOUD_ACCESS_SECRET": "nxbenchsecret",
    "NXCLOUD_APP_KEY": "nxbenchapp",
}
GOALS = {"rate_vs_sdk": 3.0, "cpu_vs_sdk": 0.3, "rate_vs_aiohttp": 1.3, "first_request_cpu_s": 0.25}

# -- the realistic list ------------------------------------------------------------------------
_PREFIXES = (
    "130 131 132 133 135 136 137 138 139 150 151 152 153 155 156 157 158 159 177 180 181 182 183 186 187 189"
)
_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡"
    "余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯"
    "龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤欧阳"
)
_GIVEN = (
    "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华玉萍红娥玲芬燕彬鑫浩宇轩子"
    "涵梓萱一诺欣怡博文雨桐思远嘉怡晨阳"
)


def write_realistic_csv(path: Path, n: int, seed: int = 16) -> int:
    """Write the list; return the number of distinct keys (the recipients to deliver)."""
    rng = random.Random(seed)
    prefixes = _PREFIXES.split()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    distinct = 0
    with tmp.open("w", newline="", encoding="utf-8", buffering=1 << 20) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "phone", "name", "code"])
        for i in range(1, n + 1):
            if i % 100 == 0:
                earlier = rng.randrange(1, i)
                earlier -= earlier % 100 == 0  # a row that has its own id
                key = f"u{earlier:08d}"  # an earlier id again: 1 % duplicates
            else:
                key = f"u{i:08d}"
                distinct += 1
            phone = prefixes[i % len(prefixes)] + f"{(i * 7919) % 100_000_000:08d}"
            given = "".join(rng.choice(_GIVEN) for _ in range(rng.randint(1, 3)))
            w.writerow([key, phone, rng.choice(_SURNAMES) + given, f"{rng.randrange(1_000_000):06d}"])
    os.replace(tmp, path)
    return distinct


def read_recipients(path: Path) -> list[tuple[str, str, str, str]]:
    """(id, phone, name, code) of the list's first row of each id: what the peers send."""
    seen: set[str] = set()
    out: list[tuple[str, str, str, str]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for key, phone, name, code in reader:
            if key not in seen:
                seen.add(key)
                out.append((key, phone, name, code))
    return out


def campaign_toml(provider: str, csv_path: Path, url: str, run_dir: Path) -> str:
    head = f'[source]\nkind = "csv"\npath = "{csv_path}"\nkey = "id"\nphone = "phone"\n\n'
    limits = (
        f"[limits]\nrequests_per_second = 100000\nconcurrency = {CONCURRENCY}\nbatch_size = {BATCH}\n\n"
        f'[run]\ndir = "{run_dir}"\n'
    )
    if provider == "aliyun":
        body = (
            f'[provider]\nkind = "aliyun"\nendpoint = "{url}"\nsignature = "v3"\n\n'
            f'[message]\ntemplate_code = "{TEMPLATE_CODE}"\nsign_name = "{SIGN_NAME}"\n'
            'params = { name = "{name}", code = "{code}" }\n\n'
        )
    elif provider == "submail":
        body = (
            f'[provider]\nkind = "submail"\nendpoint = "{url}"\nmode = "multixsend"\nsign_type = "md5"\n\n'
            f'[message]\nproject = "{SUBMAIL_PROJECT}"\nsign_name = "{SIGN_NAME}"\n'
            'params = { name = "{name}", code = "{code}" }\n\n'
        )
    else:
        body = (
            f'[provider]\nkind = "nxcloud"\nendpoint = "{url}"\n\n'
            f'[message]\nsign_name = "{SIGN_NAME}"\ncontent = "{NX_CONTENT}"\n\n'
        )
    return head + body + limits


# -- the peers (run as a child: ``python -m benchmarks.bench_campaign peer ...``) -------------------
def _sdk(url: str, recipients: list[tuple[str, str, str, str]]) -> int:
    """The official SDK as the benchmarks' ``peers.official_sdk``, on the list's data."""
    import urllib.parse

    from alibabacloud_dysmsapi20170525.client import Client  # type: ignore[import-untyped]
    from alibabacloud_dysmsapi20170525.models import SendBatchSmsRequest  # type: ignore[import-untyped]
    from alibabacloud_tea_openapi.models import Config  # type: ignore[import-untyped]
    from darabonba.runtime import RuntimeOptions  # type: ignore[import-untyped]

    netloc = urllib.parse.urlsplit(url).netloc
    client = Client(
        Config(
            access_key_id=ENV["ALIYUN_ACCESS_KEY_ID"],
            access_key_secret=ENV["ALIYUN_ACCESS_KEY_SECRET"],
            endpoint=netloc,
            protocol="http",
        )
    )

    def send(lo: int) -> int:
        part = recipients[lo : lo + BATCH]
        request = SendBatchSmsRequest(
            phone_number_json=json.dumps([r[1] for r in part]),
            sign_name_json=json.dumps([SIGN_NAME] * len(part)),
            template_code=TEMPLATE_CODE,
            template_param_json=json.dumps([{"name": r[2], "code": r[3]} for r in part]),
            out_id=f"sdk-{lo}",
        )
        response = client.send_batch_sms_with_options(request, RuntimeOptions())
        return len(part) if response.body is not None and response.body.code == "OK" else 0

    with ThreadPoolExecutor(max_workers=32) as pool:
        return sum(pool.map(send, range(0, len(recipients), BATCH)))


def _aiohttp(provider: str, url: str, recipients: list[tuple[str, str, str, str]]) -> int:
    """Every batch a task behind a Semaphore(64); sluice's provider module signs."""
    import aiohttp
    import httpx
    import orjson

    from providers.aliyun import AliyunCredentials, AliyunSms
    from providers.base import Batch, Message
    from providers.nxcloud import NxcloudCredentials, NxcloudSms
    from providers.submail import SubmailCredentials, SubmailSms

    sender: AliyunSms | SubmailSms | NxcloudSms
    if provider == "aliyun":
        creds = AliyunCredentials(ENV["ALIYUN_ACCESS_KEY_ID"], ENV["ALIYUN_ACCESS_KEY_SECRET"])
        sender = AliyunSms(credentials=creds, template_code=TEMPLATE_CODE, endpoint=url, signature="v3")
    elif provider == "submail":
        sender = SubmailSms(
            credentials=SubmailCredentials(ENV["SUBMAIL_APPID"], ENV["SUBMAIL_APPKEY"]),
            mode="multixsend",
            project=SUBMAIL_PROJECT,
            endpoint=url,
        )
    else:
        sender = NxcloudSms(
            credentials=NxcloudCredentials(
                ENV["NXCLOUD_ACCESS_KEY"], ENV["NXCLOUD_ACCESS_SECRET"], ENV["NXCLOUD_APP_KEY"]
            ),
            run_tag="peer",
            endpoint=url.rstrip("/") + "/v1/sms/multi/mt",
        )

    def message(i: int, r: tuple[str, str, str, str]) -> Message:
        key, phone, name, code = r
        if provider == "nxcloud":
            return Message(i, key, "86" + phone, {}, SIGN_NAME, NX_CONTENT.format(name=name, code=code))
        return Message(i, key, "86" + phone, {"name": name, "code": code}, SIGN_NAME)

    def accepted(body: bytes, n: int) -> int:
        data = orjson.loads(body)
        if provider == "aliyun":
            return n if data.get("Code") == "OK" else 0
        if provider == "submail":
            return sum(1 for e in data if e.get("status") == "success")
        return sum(1 for e in data.get("data") or () if e.get("status") == "Success")

    async def main() -> int:
        sem = asyncio.Semaphore(CONCURRENCY)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:
            if isinstance(sender, SubmailSms):  # md5 signing carries SUBMAIL's time
                ts = sender.timestamp_request()
                async with session.get(str(ts.url)) as resp:
                    sender.set_server_offset(float((await resp.json())["timestamp"]), time.time())

            async def send(batch_id: int, lo: int) -> int:
                async with sem:
                    part = recipients[lo : lo + BATCH]
                    messages = [message(lo + j, r) for j, r in enumerate(part)]
                    batch = Batch(batch_id, messages, out_id=f"p{batch_id}")
                    request: httpx.Request = sender.build_request(batch)
                    headers = {k: v for k, v in request.headers.items() if k != "content-length"}
                    async with session.post(str(request.url), headers=headers, data=request.content) as resp:
                        return accepted(await resp.read(), len(part)) if resp.status == 200 else 0

            results = await asyncio.gather(
                *(send(b, lo) for b, lo in enumerate(range(0, len(recipients), BATCH), 1))
            )
        return sum(results)

    import uvloop

    result: int = uvloop.run(main())
    return result


def peer_main(client: str, provider: str, url: str, csv_path: Path) -> int:
    t0, c0 = time.perf_counter(), time.process_time()
    recipients = read_recipients(csv_path)
    t1, c1 = time.perf_counter(), time.process_time()
    ok = _sdk(url, recipients) if client == "sdk" else _aiohttp(provider, url, recipients)
    t2, c2 = time.perf_counter(), time.process_time()
    child_result(
        accepted=ok, recipients=len(recipients), read_wall_s=t1 - t0, read_cpu_s=c1 - c0,
        send_wall_s=t2 - t1, send_cpu_s=c2 - c1,
    )  # fmt: skip
    return 0 if ok == len(recipients) else 1


# -- measuring ----------------------------------------------------------------------------------
def _sluice_command() -> list[str]:
    script = Path(sys.executable).with_name("sluice")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.app.cli"]


def _spawn(
    args: Sequence[str], env: dict[str, str], out: Path, preexec: Callable[[], None] | None
) -> tuple[subprocess.Popen[bytes], float]:
    with out.open("wb") as f:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            args, cwd=REPO, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
    return proc, t0


def measure(
    provider: str,
    client: str,
    resp: Responder,
    *,
    csv_path: Path,
    distinct: int,
    work: Path,
    round_no: int,
    core: int | None,
    max_wait_quiet: float,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """One whole-process run of ``client``; checks delivery; returns its figures."""
    quiet = wait_quiet(max_wait_quiet) if max_wait_quiet > 0 else None
    before = resp.reset()
    foreign = ForeignLoad()
    tag = f"{provider}-{client}-{round_no}"
    if client == "sluice":
        run_dir = work / f"run-{tag}"
        campaign = work / f"campaign-{tag}.toml"
        campaign.write_text(campaign_toml(provider, csv_path, resp.url, run_dir))
        args = [*_sluice_command(), "run", str(campaign)]
    else:
        args = [sys.executable, "-m", "benchmarks.bench_campaign", "peer", client, provider, resp.url]
        args.append(str(csv_path))
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    env = {**ENV, "PYTHONPATH": str(REPO)}  # this checkout's code, whatever is installed
    proc, t0 = _spawn(args, env, work / f"out-{tag}.txt", pin)
    resp._get(f"/__watch?pid={proc.pid}")
    deadline = time.monotonic() + timeout
    while True:  # bounded: wait4 without blocking forever
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise BenchError(f"{tag} ran past {timeout} s")
        time.sleep(0.005)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = (work / f"out-{tag}.txt").read_text(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{tag} exited {proc.returncode}:\n{output[-3000:]}")
    after = resp.stats()
    cpu = ru.ru_utime + ru.ru_stime
    resp_cpu = after["cpu_s"] - before["cpu_s"]
    if after["recipients"] != distinct:
        counted = after["recipients"]
        raise BenchError(f"{tag}: {distinct} distinct recipients, the responder counted {counted}")
    detail: dict[str, Any] = {}
    if client != "sluice":
        detail = json.loads(output.strip().splitlines()[-1])
        if detail["accepted"] != distinct:
            raise BenchError(f"{tag}: the peer reports {detail['accepted']} accepted of {distinct}")
    return {
        "provider": provider,
        "client": client,
        "round": round_no,
        "recipients": distinct,
        "requests": after["posts"],
        "wall_s": round(wall, 4),
        "recipients_per_s": distinct / wall,
        "cpu_s": round(cpu, 4),
        "cpu_us_per_recipient": cpu * 1e6 / distinct,
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
        "first_request_s": round(after["first_post"] - t0, 4),
        "first_request_cpu_s": after["first_post_client_cpu_s"],
        "responder_cpu_us_per_request": resp_cpu * 1e6 / max(1, after["posts"]),
        "foreign_load_cores": round(foreign.cores(cpu + resp_cpu), 3),
        "quiet_wait": quiet,
        "peer_detail": detail,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for provider in PROVIDERS:
        mine = [r for r in runs if r["provider"] == provider]
        if not mine:
            continue
        rows: dict[str, Any] = {}
        for client in CLIENTS[provider]:
            rs = [r for r in mine if r["client"] == client]
            if not rs:
                continue
            rows[client] = {
                k: median([r[k] for r in rs if r[k] is not None])
                for k in (
                    "recipients_per_s",
                    "cpu_us_per_recipient",
                    "peak_rss_mib",
                    "first_request_s",
                    "first_request_cpu_s",
                    "responder_cpu_us_per_request",
                )
            }
            rows[client]["max_foreign_load_cores"] = max(r["foreign_load_cores"] for r in rs)
            rows[client]["rounds"] = len(rs)
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in mine:
            by_round.setdefault(r["round"], {})[r["client"]] = r
        paired: dict[str, Any] = {}
        for peer in CLIENTS[provider][1:]:
            pairs = [b for b in by_round.values() if "sluice" in b and peer in b]
            rate = [b["sluice"]["recipients_per_s"] / b[peer]["recipients_per_s"] for b in pairs]
            cpu = [b["sluice"]["cpu_us_per_recipient"] / b[peer]["cpu_us_per_recipient"] for b in pairs]
            paired[peer] = {"rate": rate, "cpu": cpu, "rate_median": median(rate), "cpu_median": median(cpu)}
        out[provider] = {"clients": rows, "paired": paired}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["peer"]:
        client, provider, url, path = argv[1:5]
        if not url.startswith("http://127.0.0.1:"):
            raise SystemExit("loopback URLs only")
        return peer_main(client, provider, url, Path(path))
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_campaign", description=__doc__.split("\n")[0]
    )
    p.add_argument("--recipients", type=int, default=200_000, help="rows in the list (1 %% are duplicates)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--max-wait-quiet", type=float, default=30.0)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", default="campaign.json", help="file name under benchmarks/results/")
    args = p.parse_args(argv)
    if not 1000 <= args.recipients <= 10_000_000 or not 1 <= args.rounds <= 20:
        p.error("--recipients must be 1000..10 000 000 and --rounds 1..20")
    providers = [x for x in args.providers.split(",") if x]
    if any(x not in PROVIDERS for x in providers):
        p.error(f"providers: a subset of {','.join(PROVIDERS)}")
    bytecode = compile_bytecode()
    cores = os.sched_getaffinity(0)
    pin = not args.no_pin and len(cores) >= 2
    client_core, responder_core = (min(cores), max(cores)) if pin else (None, None)

    with tempfile.TemporaryDirectory(prefix="sluice-campaign-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        csv_path = work / f"campaign-{args.recipients}.csv"
        distinct = write_realistic_csv(csv_path, args.recipients)
        runs: list[dict[str, Any]] = []
        with responder() as resp:
            if responder_core is not None:
                os.sched_setaffinity(resp.proc.pid, {responder_core})
            for provider in providers:
                clients = list(CLIENTS[provider])
                for rnd in range(args.rounds):
                    order = clients[rnd % len(clients) :] + clients[: rnd % len(clients)]
                    for c in order:
                        r = measure(
                            provider, c, resp, csv_path=csv_path, distinct=distinct, work=work,
                            round_no=rnd, core=client_core, max_wait_quiet=args.max_wait_quiet,
                        )  # fmt: skip
                        runs.append(r)
                        print(
                            f"{provider:8s} round {rnd} {c:8s} {r['recipients_per_s']:>9,.0f} recipients/s "
                            f"{r['cpu_us_per_recipient']:6.2f} µs CPU/recipient {r['peak_rss_mib']:6.1f} MiB "
                            f"first request {r['first_request_s']:.3f} s / {r['first_request_cpu_s']} s CPU "
                            f"(others used {r['foreign_load_cores']:.2f} cores)",
                            file=sys.stderr,
                        )

    summary = summarize(runs)
    doc = {
        "benchmark": "campaign",
        "command": "python -m benchmarks.bench_campaign " + " ".join(argv),
        "machine": machine_info(),
        "bytecode": bytecode,
        "pinned": {"client_core": client_core, "responder_core": responder_core},
        "rows": args.recipients,
        "distinct_recipients": distinct,
        "rounds": args.rounds,
        "summary": summary,
        "goals": GOALS,
        "runs": runs,
    }
    written = write_json(args.out, doc)
    for provider, s in summary.items():
        rows = []
        sl = s["clients"].get("sluice")
        for client, row in s["clients"].items():
            rows.append(
                [
                    LABELS[client],
                    row["recipients_per_s"],
                    row["cpu_us_per_recipient"],
                    row["peak_rss_mib"],
                    row["first_request_s"],
                    row["first_request_cpu_s"],
                    f"{sl['recipients_per_s'] / row['recipients_per_s']:.2f}×" if sl else "–",
                    f"{sl['cpu_us_per_recipient'] / row['cpu_us_per_recipient']:.2f}×" if sl else "–",
                    row["max_foreign_load_cores"],
                ]
            )
        what = f"{distinct:,} distinct recipients of {args.recipients:,} rows, medians of {args.rounds}"
        print(f"\n{provider} ({what}):")
        print(
            markdown_table(
                [
                    "client",
                    "recipients/s",
                    "CPU µs/recipient",
                    "peak RSS MiB",
                    "first request s",
                    "first request CPU s",
                    "sluice/peer rate",
                    "sluice/peer CPU",
                    "others' load (max, cores)",
                ],
                rows,
            )
        )
        for peer, pr in s["paired"].items():
            print(
                f"per round, sluice/{peer}: rate "
                + ", ".join(f"{x:.2f}×" for x in pr["rate"])
                + f" (median {pr['rate_median']:.2f}×); CPU "
                + ", ".join(f"{x:.3f}×" for x in pr["cpu"])
                + f" (median {pr['cpu_median']:.3f}×)"
            )
    print(f"\nwritten {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
