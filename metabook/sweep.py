"""Sweeps: chapters x grid points x arms x seeds as independent units on an engine
(`python -m metabook sweep`; the README's "Sweeps" section and book/09_sweeps.ipynb show it).

A unit is one (chapter, grid point, arm, seed), trained exactly as `run_arms` would
(train.run_arm_seed); once every unit of a run folder is done, the chapter's own `run_chapter`
writes its result.json from the finished runs. A unit waits for what it needs (the same-time
baseline for its target, an arm for its shared one-off stage), is retried from its checkpoint when
its worker dies, and once finished is never run again. Engines: local (a process pool), ray, slurm.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError

ENGINES = ("local", "ray", "slurm")
BASE_MEMORY = 2 << 30     # bytes a unit's process holds besides its steps: torch, the dataset, evaluation


class WorkerDied(Exception):
    """A unit's worker process ended without a result (killed, out of memory, preempted)."""


@dataclass(frozen=True)
class Unit:
    """One unit: an arm (or a shared one-off stage) of one experiment, for one seed."""
    chapter: str
    preset: str
    overrides: tuple            # ((key, value), ...): --set and the grid point's values
    point: str                  # the grid point, "k=v,..." ("" without --grid)
    label: str                  # the experiment (compare: the method; "" for a method chapter)
    out: str                    # the experiment's run folder
    arm: str                    # an arm, or "stage-<name>" for a shared one-off stage
    seed: int
    seeds: tuple                # every seed of the sweep (same_time_steps replays by position)
    after: tuple = ()           # names of the units this one waits for
    stage_arm: str = ""         # for a stage: the arm whose prepare() makes it

    @property
    def name(self) -> str:
        parts = [self.chapter, self.point, self.label, f"{self.arm}-seed{self.seed}"]
        return "/".join(p for p in parts if p)

    def finished(self) -> bool:
        return (Path(self.out) / "runs" / f"{self.arm}-seed{self.seed}.json").exists()


@dataclass
class Record:
    """One result.json the sweep writes: a chapter at a grid point, when all its units are done."""
    chapter: str
    point: str
    overrides: dict
    out: Path
    units: list = field(default_factory=list)


# ----------------------------------------------------------------------------- units

def parse_grid(pairs: list[str] | None) -> list[dict]:
    """['noise.rate=0.2,0.4', 'lr=0.1,0.05'] -> the 4 points of the product, in order (one
    empty point without --grid). Values are split at commas."""
    import itertools

    axes = []
    for pair in pairs or []:
        key, sep, values = pair.partition("=")
        if not sep or not key.strip() or not values.strip(","):
            raise ConfigError(f"--grid expects key=value1,value2,..., got {pair!r}")
        axes.append([(key.strip(), v) for v in values.split(",") if v])
    return [dict(p) for p in itertools.product(*axes)]


def point_name(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def shared_stage(arm, arm_cfg: dict) -> str | None:
    """The name of the one-off stage this arm shares with others through RUN/cache, or None:
    Grad-Instructor's ENN (one per ENN config, the key its cache file is named by)."""
    from .methods.enn import enn_config_key
    from .methods.grad_instructor import GradInstructor

    method = arm.factory(arm_cfg)
    if isinstance(method, GradInstructor) and not method.given:
        key = json.dumps(enn_config_key(arm_cfg), sort_keys=True, default=str)
        return "enn-" + hashlib.sha1(key.encode()).hexdigest()[:10]
    return None


def plan_units(chapters: list[str], preset: str, seeds: list[int], overrides: dict, grid: list[dict],
               out) -> list[Record]:
    """Every record of the sweep with its units (arms x seeds, stages, dependencies). A --set or
    --grid key applies to the chapters that have it (a grid a chapter does not have gives it one
    record). Bad input (a chapter, key or value) raises ConfigError here, before anything runs."""
    from .config import all_keys
    from .methods import CHAPTERS, chapter_config, chapter_module

    unknown = [c for c in chapters if c not in CHAPTERS]
    if unknown:
        raise ConfigError(f"unknown chapter {unknown[0]!r}; choose from: {', '.join(CHAPTERS)}")
    known = {c: all_keys(chapter_module(c).SECTIONS) for c in chapters}
    # a key that only some chapters have applies to those (a key no chapter has fails in chapter_config)
    mine = lambda chapter, d: {k: v for k, v in d.items() if k in known[chapter] or
                               not any(k in keys for keys in known.values())}
    records = []
    for chapter in chapters:
        points = {point_name(mine(chapter, p)): mine(chapter, p) for p in grid}
        for point in points.values():
            over = {**mine(chapter, overrides), **point}
            cfg = chapter_config(chapter, preset, over)
            rec = Record(chapter, point_name(point), over, Path(out) / chapter / point_name(point))
            for exp in chapter_module(chapter).experiments(cfg):
                rec.units += experiment_units(exp, rec, cfg["preset"], seeds)
            records.append(rec)
    return records


def experiment_units(exp, rec: Record, preset: str, seeds: list[int]) -> list[Unit]:
    """The units of one train.Experiment: per seed, its shared stages, its arms, and the
    reference arm at the same-time arm's wall-clock after both."""
    run_dir = rec.out / exp.label if exp.label else rec.out
    base = dict(chapter=rec.chapter, preset=preset, overrides=tuple(sorted(rec.overrides.items())),
                point=rec.point, label=exp.label, out=str(run_dir), seeds=tuple(seeds))
    name = lambda arm, seed: Unit(**base, arm=arm, seed=seed).name
    units = []
    for seed in seeds:
        stages = {}
        for arm_name, arm in exp.arms.items():
            arm_cfg = {**exp.cfg, **arm.changes}
            if arm.factory(arm_cfg).uses_meta and exp.cfg["meta_size"] < 1:
                raise ConfigError(f"arm {arm_name!r} needs meta batches but meta_size={exp.cfg['meta_size']}; "
                                  f"set meta_size >= 1 or leave that arm out")
            stage = shared_stage(arm, arm_cfg)
            after = ()
            if stage:
                if stage not in stages:
                    stages[stage] = Unit(**base, arm=f"stage-{stage}", seed=seed, stage_arm=arm_name)
                after = (stages[stage].name,)
            units.append(Unit(**base, arm=arm_name, seed=seed, after=after))
        units[len(units) - len(exp.arms):len(units) - len(exp.arms)] = stages.values()   # stages first
        if exp.same_time_for:
            units.append(Unit(**base, arm="baseline_same_time", seed=seed, after=(name(exp.same_time_for, seed),)))
    return units


# ----------------------------------------------------------------------------- one unit (in a worker)

_DRIVER: int | None = None        # in a local sweep's worker: the pid of the sweep that started it
_IN_UNIT = threading.Event()


def local_worker_start(driver: int) -> None:
    """A local sweep's worker process starts: it ignores SIGINT while idle (run_unit takes it for
    a unit), and a thread watches the driver. If the driver dies alone (SIGKILL, out of memory),
    the unit in flight gets SIGINT, checkpoints and ends, and the worker exits, instead of training
    on as an orphan that holds the unit's lock."""
    global _DRIVER
    _DRIVER = driver
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == driver:
            time.sleep(1.0)
        if _IN_UNIT.is_set():
            os.kill(os.getpid(), signal.SIGINT)      # run_unit exits the process once the unit has stopped
        else:
            os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def run_unit(unit: Unit) -> dict:
    """Run one unit in this process. Returns {"unit", "seconds", "resumed_from", "pid", "host",
    "start", "end"} (start and end: wall-clock times) or, for a failure a retry cannot fix,
    {"unit", "error"}. Anything else raises (a bug, shown whole)."""
    from .data import DataError
    from .train import NonFiniteError, OutLock, RunError

    t0, start = time.perf_counter(), time.time()
    lock = Path(unit.out) / ".units" / f"{unit.arm}-seed{unit.seed}"
    main_thread = threading.current_thread() is threading.main_thread()
    idle = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    _IN_UNIT.set()
    try:                       # SIGINT stops a unit (training checkpoints first), whatever an idle worker does
        with OutLock(lock):
            resumed = _run_unit(unit)
    except (ConfigError, DataError, NonFiniteError, RunError) as err:
        return {"unit": unit.name, "error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
    finally:
        _IN_UNIT.clear()
        if main_thread:
            signal.signal(signal.SIGINT, idle)
        if _DRIVER is not None and os.getppid() != _DRIVER:      # the driver died: nobody takes the result
            os._exit(1)
    return {"unit": unit.name, "seconds": time.perf_counter() - t0, "resumed_from": resumed, "pid": os.getpid(),
            "host": socket.gethostname(), "start": start, "end": time.time()}


_DATASETS: dict = {}


def _run_unit(unit: Unit) -> int | None:
    """Train the unit (or make its stage); returns the step its checkpoint resumed from, if any."""
    import torch

    from .config import pick_device
    from .data import load_dataset
    from .methods import chapter_config, chapter_module
    from .results import write_json
    from .train import arm_seed_config, fresh_method, prepare_data, run_arm_seed, same_time_ratio, seed_everything

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = chapter_config(unit.chapter, unit.preset, dict(unit.overrides))
    exp = next(e for e in chapter_module(unit.chapter).experiments(cfg) if e.label == unit.label)
    device = pick_device(exp.cfg["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if exp.cfg["dataset"] not in _DATASETS:    # a worker that runs several units loads the data once
        _DATASETS.clear()
        _DATASETS[exp.cfg["dataset"]] = load_dataset(exp.cfg["dataset"])
    data = prepare_data(exp.cfg, unit.seed, device, _DATASETS[exp.cfg["dataset"]])
    out = Path(unit.out)
    if unit.stage_arm:           # the shared one-off stage: the arm's prepare() fills RUN/cache
        arm = exp.arms[unit.stage_arm]
        method = fresh_method(arm, {**exp.cfg, **arm.changes}, data, unit.seed)
        method.ctx.cache_dir = out / "cache"
        seed_everything(unit.seed)                     # as train() does before prepare(), timed as it does
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            method.prepare()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        write_json({"stage": unit.stage_arm, "one_off_seconds": time.perf_counter() - t0,
                    "one_off_cpu_seconds": time.process_time() - c0 if device.type != "cuda" else None},
                   out / "runs" / f"{unit.arm}-seed{unit.seed}.json")
        return None
    one_off = None            # an arm whose stage another unit ran is charged that stage's time
    for name in unit.after:
        if "/stage-" in name or name.startswith("stage-"):
            stage = json.loads((out / "runs" / f"{name.split('/')[-1]}.json").read_text())
            one_off = {k: stage[k] for k in ("one_off_seconds", "one_off_cpu_seconds") if stage.get(k) is not None}
    target_cost = ratio = None
    if unit.arm == "baseline_same_time" and not exp.cfg["same_time_steps"]:
        target_cost = json.loads((out / "runs" / f"{exp.same_time_for}-seed{unit.seed}.json").read_text())["cost"]
        ratio = same_time_ratio(exp.arms, exp.cfg, exp.same_time_for, exp.reference, unit.seed,
                                _DATASETS[exp.cfg["dataset"]], out)
    arm_cfgs = {n: {**exp.cfg, **a.changes} for n, a in exp.arms.items()}
    arm_cfg = arm_seed_config(unit.arm, arm_cfgs, exp.cfg, unit.seed, list(unit.seeds), len(data.train),
                              exp.reference, exp.same_time_for, target_cost, ratio)
    ckpt = out / "runs" / f"{unit.arm}-seed{unit.seed}" / "checkpoint.pt"
    resumed = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else None
    run_arm_seed(unit.arm, exp.arms.get(unit.arm, exp.arms[exp.reference]), arm_cfg, data, unit.seed, out,
                 progress=False, one_off=one_off)
    return resumed


# ----------------------------------------------------------------------------- resources

def unit_resources(unit: Unit, cpus: int = 1, gpus: int | None = None, plan_rows: list[dict] | None = None) -> dict:
    """What a unit asks its engine for: CPUs, GPUs (default: 1 where the config trains on CUDA,
    or at the gpu and paper presets with device=auto) and memory in bytes: BASE_MEMORY plus the
    written plan's peak for that arm (train and one-off stages) where a row has this config's
    hash, else None (no memory request)."""
    from .methods import chapter_config, chapter_module
    from .plan import config_sha, read_plan

    cfg = chapter_config(unit.chapter, unit.preset, dict(unit.overrides))
    if gpus is None:
        gpus = int(cfg["device"] == "cuda" or (cfg["device"] == "auto" and cfg["preset"] in ("gpu", "paper")))
    exp = next(e for e in chapter_module(unit.chapter).experiments(cfg) if e.label == unit.label)
    arm_name = unit.stage_arm or unit.arm
    arm = exp.arms.get(arm_name, exp.arms[exp.reference])
    sha = config_sha({**exp.cfg, **arm.changes})
    rows = read_plan() if plan_rows is None else plan_rows
    peaks = [r["peak_bytes"] for r in rows if r["chapter"] == unit.chapter and r["preset"] == cfg["preset"]
             and r["arm"] == arm_name and r.get("experiment", "") == unit.label and r["config_sha"] == sha]
    return {"cpus": cpus, "gpus": gpus, "memory": BASE_MEMORY + max(peaks) if peaks and not gpus else None}


def slurm_parameters(unit: Unit, res: dict, timeout_min: int = 240, partition: str | None = None) -> dict:
    """The submitit (AutoExecutor.update_parameters) parameters of one unit's Slurm job: its
    name, a time limit, one task with res['cpus'] CPUs, res['gpus'] GPUs and the memory asked for
    (GiB, rounded up; none: Slurm's default)."""
    params = {"name": unit.name.replace("/", ".")[:120], "timeout_min": timeout_min, "nodes": 1,
              "tasks_per_node": 1, "cpus_per_task": res["cpus"], "gpus_per_node": res["gpus"],
              "slurm_signal_delay_s": 120}
    if res.get("memory"):
        params["mem_gb"] = -(-res["memory"] // (1 << 30))
    if partition:
        params["slurm_partition"] = partition
    return params


# ----------------------------------------------------------------------------- engines

class LocalEngine:
    """A process pool on this machine (spawned workers, one thread each unless OMP_NUM_THREADS says).
    A worker that dies breaks the pool: every unit in flight then counts as died, and each resumes
    from its checkpoint in a new pool. Ctrl-C: `interrupt` passes it on to the workers (a SIGINT
    sent to the sweep's process alone, as `kill -INT` or a notebook's interrupt does, reaches no
    worker), so every unit in flight checkpoints after its step and stops; idle workers ignore
    SIGINT, so the pool does not break while it shuts down. A driver killed alone: its workers
    stop the same way (local_worker_start)."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def submit(self, unit: Unit, res: dict):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        for _ in range(2):
            if self.pool is None:
                self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                                initializer=local_worker_start, initargs=(os.getpid(),))
            try:
                return self.pool.submit(run_unit, unit)
            except BrokenProcessPool:          # a worker died: the pool is gone, start another
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
        raise RuntimeError("the process pool could not be restarted")

    def wait(self, handles: list) -> list:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            try:
                out.append((f, f.result()))
            except BrokenProcessPool as err:
                out.append((f, WorkerDied(f"a worker process ended abruptly ({err})")))
        return out

    def interrupt(self):
        if self.pool is not None:          # (the pool keeps its processes in a private dict, pid -> process)
            for pid in list(getattr(self.pool, "_processes", None) or {}):
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    def close(self):
        if self.pool is not None:          # waits for the units in flight (after interrupt: their checkpoints)
            self.pool.shutdown(wait=True, cancel_futures=True)


class RayEngine:
    """Ray tasks: each unit with its CPUs, GPUs and memory; Ray itself re-runs a task whose worker
    died (max_retries), and never one that raised (a bug). Ctrl-C: `interrupt` cancels the tasks
    in flight (ray.cancel runs a running task's SIGINT handler, so the unit checkpoints after its
    step and stops; a task not yet started never starts), and `close` waits for them."""

    def __init__(self, address: str | None, retries: int, workers: int | None = None):
        import ray

        from .train import RunError

        kwargs = {} if address else {"num_cpus": workers}
        for attempt in range(3):       # Ray gives a new node 30 s to start: a loaded machine may need more goes
            if ray.is_initialized():
                break
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
            except Exception as err:
                ray.shutdown()
                if attempt == 2 or "timed out during startup" not in str(err):
                    where = f"the cluster at {address}" if address else "a local Ray instance"
                    raise RunError(f"could not start {where} ({' '.join(str(err).split())[:200]}); check "
                                   f"--address, or use --engine local") from None
        self.ray, self.retries = ray, retries
        self.task = ray.remote(run_unit)
        self.in_flight, self.interrupted = set(), False

    def submit(self, unit: Unit, res: dict):
        opts = {"num_cpus": res["cpus"], "num_gpus": res["gpus"], "max_retries": self.retries,
                "retry_exceptions": False, "name": unit.name}
        if res.get("memory"):
            opts["memory"] = res["memory"]
        ref = self.task.options(**opts).remote(unit)
        self.in_flight.add(ref)
        return ref

    def wait(self, handles: list) -> list:
        ready, _ = self.ray.wait(handles, num_returns=1)
        self.in_flight.difference_update(ready)
        out = []
        for ref in ready:
            try:
                out.append((ref, self.ray.get(ref)))
            except (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError,
                    self.ray.exceptions.OutOfMemoryError) as err:      # Ray re-ran it `retries` times already
                died = WorkerDied(f"its worker died {self.retries + 1} times ({type(err).__name__})")
                died.final = True
                out.append((ref, died))
            except self.ray.exceptions.RayTaskError as err:
                out.append((ref, err.as_instanceof_cause() if hasattr(err, "as_instanceof_cause") else err))
        return out

    def interrupt(self):
        self.interrupted = True
        for ref in self.in_flight:
            self.ray.cancel(ref)

    def close(self):
        if self.interrupted and self.in_flight:      # the cancelled units checkpoint, then end
            self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight))


class SlurmEngine:
    """One submitit job per unit (a dependent unit is submitted once what it waits for is done);
    a job that ends without a result (killed, preempted, timed out) is submitted again."""

    def __init__(self, folder: Path, timeout_min: int, partition: str | None, cluster: str | None = None):
        import submitit

        self.submitit = submitit
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self.timeout_min, self.partition = timeout_min, partition

    def submit(self, unit: Unit, res: dict):
        self.executor.update_parameters(**slurm_parameters(unit, res, self.timeout_min, self.partition))
        return self.executor.submit(run_unit, unit)

    def wait(self, handles: list) -> list:
        while True:           # (submitit's debug cluster runs a job in this process when asked for it)
            done = handles[:1] if self.executor.cluster == "debug" else [j for j in handles if j.done()]
            if done:
                break
            time.sleep(5)
        out = []
        for job in done:
            try:
                out.append((job, job.result()))
            except self.submitit.core.utils.UncompletedJobError as err:
                out.append((job, WorkerDied(f"job {job.job_id} ended without a result ({' '.join(str(err).split())[:200]})")))
            except Exception as err:                   # the unit raised: a bug, not a retry
                out.append((job, err))
        return out

    def interrupt(self):
        pass                   # the jobs are the cluster's: they run on (scancel stops them)

    def close(self):
        pass


# ----------------------------------------------------------------------------- the sweep

def _log(line: str) -> None:
    print(line, flush=True)


def schedule(units: list[Unit], engine, resources: dict, retries: int = 2, log=_log) -> dict:
    """Run the units on `engine`, each once what it waits for is done; finished units are
    skipped (a stage is skipped when every arm that uses it is finished). Returns
    {"done": {name: result}, "failed": {name: error}, "skipped": [names]}."""
    by_name = {u.name: u for u in units}
    needed = {u.after[0] for u in units if u.after and not u.finished() and by_name[u.after[0]].stage_arm}
    skipped = [u.name for u in units if u.finished() or (u.stage_arm and u.name not in needed)]
    ok: set[str] = set(skipped)
    pending = {u.name: u for u in units if u.name not in ok}
    done, failed, attempts, running = {}, {}, {}, {}
    while pending or running:
        for name, u in list(pending.items()):
            bad = [a for a in u.after if a in failed]
            if bad:
                failed[name] = f"not run: {bad[0]} failed"
                del pending[name]
            elif all(a in ok for a in u.after):
                running[engine.submit(u, resources[name])] = (u, time.time())
                del pending[name]
        if not running:
            break
        for handle, result in engine.wait(list(running)):
            u, t_submit = running.pop(handle)
            if isinstance(result, WorkerDied) and not getattr(result, "final", False) \
                    and attempts.get(u.name, 0) < retries:
                attempts[u.name] = attempts.get(u.name, 0) + 1
                log(f"retry {u.name}: {result} (attempt {attempts[u.name] + 1}; it resumes from its checkpoint)")
                pending[u.name] = u
            elif isinstance(result, Exception):
                failed[u.name] = f"{type(result).__name__}: {' '.join(str(result).split())[:300]}"
                log(f"FAILED {u.name}: {failed[u.name]}")
            elif "error" in result:
                failed[u.name] = result["error"]
                log(f"FAILED {u.name}: {result['error']}")
            else:
                result["latency"] = time.time() - t_submit
                done[u.name], _ = result, ok.add(u.name)
                resumed = f", resumed from step {result['resumed_from']}" if result.get("resumed_from") else ""
                log(f"done {u.name} in {result['seconds']:.1f} s{resumed}")
    return {"done": done, "failed": failed, "skipped": skipped}


def sweep(chapters: list[str], preset: str, seeds: list[int], out, overrides: dict | None = None,
          grid: list[str] | None = None, engine: str = "local", workers: int | None = None,
          address: str | None = None, retries: int = 2, cpus: int = 1, gpus: int | None = None,
          timeout_min: int = 240, partition: str | None = None, cluster: str | None = None, log=_log) -> dict:
    """Plan the units, run them on `engine`, then write every record whose units all finished
    (run_chapter on its folder, which trains nothing). Returns schedule()'s dict plus `records`
    (result.json paths), `wall_s` (the units on the engine, from its start), `assembly_s` (the
    records), `unit_s` (the units' own seconds, summed) and `slots` (workers); all of it also goes
    to OUT/sweep.json (each unit's worker, start and end: the sweep's timeline)."""
    from .methods import run_chapter

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    package = {"ray": "ray", "slurm": "submitit"}.get(engine)
    if package:
        try:
            __import__(package)
        except ImportError:
            raise ConfigError(f"--engine {engine} needs {package}, which is not installed: pip install "
                              f"'metabook[sweep]' (or use --engine local)") from None
    out = Path(out)
    records = plan_units(chapters, preset, seeds, overrides or {}, parse_grid(grid), out)
    units = [u for r in records for u in r.units]
    resources = {u.name: unit_resources(u, cpus, gpus) for u in units}
    workers = workers or os.cpu_count() or 1
    t0, load0 = time.time(), os.getloadavg()
    if engine == "local":
        eng = LocalEngine(workers)
    elif engine == "ray":
        eng = RayEngine(address, retries, workers)
    else:
        eng = SlurmEngine(out / "slurm", timeout_min, partition, cluster)
    log(f"sweep: {len(records)} record(s), {len(units)} units on {engine}")
    try:
        result = schedule(units, eng, resources, retries, log)
    except KeyboardInterrupt:
        eng.interrupt()
        raise
    finally:
        eng.close()
    wall = time.time() - t0
    written = []
    for rec in records:
        if any(u.name in result["failed"] for u in rec.units):
            continue
        run_chapter(rec.chapter, preset, seeds, rec.out, rec.overrides, progress=False)
        written.append(rec.out / "result.json")
        log(f"wrote {rec.out / 'result.json'}")
    result.update(records=written, wall_s=wall, assembly_s=time.time() - t0 - wall, slots=workers,
                  unit_s=sum(r["seconds"] for r in result["done"].values()))
    from .results import provenance, write_json
    write_json({"chapters": chapters, "preset": preset, "seeds": seeds, "overrides": overrides or {},
                "grid": grid or [], "engine": engine, "started": t0, **result,
                "records": [str(p) for p in written], "load_avg": {"start": load0, "end": os.getloadavg()}, "provenance": provenance("cpu")}, out / "sweep.json")
    return result


def overhead_line(result: dict) -> str:
    """The sweep's wall-clock against its units' own time, and the overhead per unit: the slot
    time not spent inside a unit, (wall x slots - sum of the units' seconds) / units, which counts
    the workers' start, the engine's scheduling and transfers, and slots idle while a unit waits
    for another."""
    n = len(result["done"])
    if not n:
        return f"sweep: {result['wall_s']:.1f} s, no unit ran"
    over = (result["wall_s"] * result["slots"] - result["unit_s"]) / n
    return (f"sweep: {result['wall_s']:.1f} s wall on {result['slots']} slots for {n} units "
            f"({result['unit_s']:.1f} s of units' own time); overhead per unit {over:.2f} s")
