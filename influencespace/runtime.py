"""Ray start-up, chosen at the edge: stages never call ``ray.init`` themselves.

A local Ray is bound to 127.0.0.1 (no service of ours listens on other interfaces) and started
without the dashboard unless asked; inside ``ray job submit`` (``ray_address: auto``) the driver
joins the existing cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from influencespace.errors import ConfigError, InfluenceSpaceError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOCAL_START_ATTEMPTS = 3


def ensure_ray(runtime: Any, include_dashboard: bool = False) -> None:
    """Connect to (or start) Ray as ``runtime`` (a :class:`~influencespace.config.RuntimeConfig`) says."""
    import ray

    if ray.is_initialized():
        return
    # Keep Ray on loopback for local clusters, and quiet about usage stats (no network here).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    use_venv_build_tools()
    kwargs: dict[str, Any] = {"log_to_driver": True, "ignore_reinit_error": True}
    if runtime.ray_address:
        log.info("joining Ray cluster at %s", runtime.ray_address)
        try:
            ray.init(address=runtime.ray_address, **kwargs)
        except ConnectionError as exc:
            raise InfluenceSpaceError(
                f"could not join the Ray cluster at '{runtime.ray_address}' ({exc}); start one (`ray start --head`), "
                f"submit with `ray job submit`, or set runtime.ray_address=null to start a local Ray"
            ) from None
        return
    log.info("starting a local Ray on %s (num_cpus=%s)", LOOPBACK, runtime.num_cpus or "all")
    # address="local" always starts a fresh instance: a bare ray.init() would silently join whatever
    # cluster `ray start` last left on this machine.
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(
                address="local",
                num_cpus=runtime.num_cpus,
                include_dashboard=include_dashboard,
                _node_ip_address=LOOPBACK,
                _system_config={"num_workers_soft_limit": idle_worker_limit(runtime.num_cpus)},
                **kwargs,
            )
            return
        except Exception as exc:
            # Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py, not configurable);
            # a machine busy with other work can take longer. Ray raises a bare Exception for it, so the
            # message is all there is to recognise it by.
            if "timed out during startup" not in str(exc) or attempt == LOCAL_START_ATTEMPTS:
                raise
            log.warning("local Ray did not start in time (attempt %d of %d); starting it again",
                        attempt, LOCAL_START_ATTEMPTS)
            ray.shutdown()


def idle_worker_limit(num_cpus: int | None) -> int:
    """How many idle Ray worker processes a local Ray keeps (Ray's ``num_workers_soft_limit``).

    Ray keeps as many idle workers as the node has CPUs and kills the rest within a second. While
    Ray Train's workers hold every CPU of a small machine, the worker that ran an epoch's read task is
    one too many, so every epoch started a fresh process for its reads (importing numpy, pyarrow and
    this package): measured on this 2-core machine under load, 2–10 s before each epoch's first batch
    instead of 0.3–0.6 s (docs/training.md). A few spare idle workers cost ~100 MB each.
    """
    cpus = num_cpus or os.cpu_count() or 1
    return 2 * cpus + 4


def use_venv_build_tools() -> None:
    """Build DeepSpeed's JIT ops with this environment's own tools, into its own cache (Ray workers inherit both).

    DeepSpeed JIT-builds its ops with the first ``ninja`` on PATH into torch's extensions cache
    (``~/.cache/torch_extensions`` unless ``TORCH_EXTENSIONS_DIR`` says otherwise). Two builders that
    share that cache take each other's build for stale and rebuild the op in every Ray Train worker start
    (1–2 min each on a busy machine; seen in the test suite): the venv's ninja (a DeepSpeed dependency)
    against a system one, and two checkouts' venvs on one machine against each other (their include paths
    differ). So the interpreter's ``bin`` goes first on PATH when it holds ``ninja``, and, unless the
    user chose a cache, a virtual environment builds into its own ``<venv>/torch_extensions`` (when
    writable).
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")


def configure_data_context() -> None:
    """Ray Data settings shared by every stage: deterministic block order, Ray Data's own bars off.

    The console draws one bar per stage from what the stage counts (``influencespace.progress``);
    Ray Data's per-operator bars would only repeat that, redrawn into the stage's log file.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True


# A sliver of a custom resource pins work to a node type without limiting how much of it runs there.
NODE_RESOURCE_SHARE = 0.001


def placement(runtime: Any, kind: str) -> dict[str, Any]:
    """Ray resource requests for work of ``kind`` ('gpu': embed / influence / train; 'cpu': k-means).

    Returns keyword arguments for ``.options()`` / ``ray_remote_args``: ``num_gpus`` when GPUs are
    used, and a sliver of the node-type marker resource when the config names one (the cluster
    configs give GPU nodes ``gpu_node`` and CPU nodes ``cpu_node``).
    """
    if kind not in ("gpu", "cpu"):
        raise ValueError(f"placement kind must be 'gpu' or 'cpu', got {kind!r}")
    args: dict[str, Any] = {}
    marker = runtime.gpu_node_resource if kind == "gpu" else runtime.cpu_node_resource
    if marker:
        args["resources"] = {marker: NODE_RESOURCE_SHARE}
    if kind == "gpu" and runtime.use_gpu:
        args["num_gpus"] = 1
    return args


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to ask
    return ray is not None and ray.is_initialized()


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Ray started (or joined) inside the block is shut down when it ends; a Ray already up stays.

    The command line runs its work in one, inside the console, so what Ray's processes print while
    they stop lands in the logs and not after the final line.
    """
    already_up = _ray_is_up()
    try:
        yield
    finally:
        if not already_up and _ray_is_up():
            sys.modules["ray"].shutdown()


# --------------------------------------------------------------------------------------------------
# Ray Train worker groups (influence and train share this one way to start them)


def domain_error(exc: BaseException) -> InfluenceSpaceError | None:
    """The :class:`InfluenceSpaceError` a remote worker raised, found inside Ray's wrappers by class.

    Ray Train reports a worker's exception inside ``WorkerGroupError.worker_failures`` (and Ray core
    inside ``RayTaskError.cause``); a user error (bad input, bad config) is re-raised as itself, so the
    command line shows its one message instead of a remote traceback.
    """
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, InfluenceSpaceError):
            return current
        stack += [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                  current.__cause__, current.__context__]
        stack += list((getattr(current, "worker_failures", None) or {}).values())
    return None


def _worker_entry(config: dict[str, Any]) -> Any:
    """What each Ray Train worker runs: the storage settings of the driver, then the stage's loop."""
    from influencespace import storage

    storage.use(config["storage"])
    return config["loop"](config)


def run_torch_workers(loop: Any, config: dict[str, Any], *, runtime: Any, num_workers: int, run_config: Any,
                      datasets: dict[str, Any] | None = None, dataset_config: Any = None) -> Any:
    """Run ``loop(config)`` on ``num_workers`` Ray Train workers with torch's process group set up.

    gloo on CPU, NCCL with one GPU per worker when ``runtime.use_gpu``; each worker reserves one CPU
    and, on clusters that mark GPU nodes, a sliver of the marker. ``config`` travels to every worker
    (keep it small: URIs and k-row tables, never per-row data) together with the driver's storage
    settings. ``datasets`` (Ray Data datasets by name) are split between the workers by Ray Train,
    each worker reading its split with ``ray.train.get_dataset_shard(name)``; ``dataset_config`` is
    Ray Train's ``DataConfig``. Returns Ray Train's ``Result``; a user error raised by a worker is
    re-raised as itself.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from influencespace import storage

    ensure_ray(runtime)
    node = placement(runtime, "gpu")
    resources = {"CPU": 1.0, **({"GPU": 1.0} if runtime.use_gpu else {}), **node.get("resources", {})}
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={**config, "loop": loop, "storage": storage.current_settings()},
        torch_config=TorchConfig(backend="nccl" if runtime.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=runtime.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config,
        datasets=datasets,  # split between the workers; each reads its split with get_dataset_shard
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    try:
        return trainer.fit()
    except Exception as exc:
        found = domain_error(exc)
        if found is not None:
            raise found from None
        raise


# --------------------------------------------------------------------------------------------------
# Per-shard tasks (curate's passes): one function, run in this process or as Ray tasks


def _task_entry(settings: Any, fn: Any, item: Any) -> Any:
    from influencespace import storage

    storage.use(settings)
    return fn(item)


def map_tasks(runtime: Any, fn: Any, items: Iterable[Any], *, num_cpus: float = 1.0, window: int | None = None,
              desc: str | None = None, unit: str = "shards", kind: str = "cpu") -> Iterator[Any]:
    """``fn(item)`` for every item, results yielded in the items' order as they finish.

    ``runtime.runner == "local"`` runs them one after another in this process; ``"ray"`` as Ray tasks
    (``num_cpus`` each, the driver's storage settings shipped with them), at most ``window`` in flight
    (default: twice the cluster's CPUs), so the driver holds a bounded number of results however many
    items there are. A user error raised in a task is re-raised as itself. ``fn`` must be picklable
    (a module-level function or a ``functools.partial`` of one). With ``desc`` (and a sized ``items``)
    a progress bar counts the items done. ``kind``: where the tasks go (:func:`placement`; ``"gpu"``
    gives each task a GPU when ``runtime.use_gpu``).
    """
    if desc is None:
        yield from _map_tasks(runtime, fn, items, num_cpus, window, kind)
        return
    from influencespace import progress

    items = list(items)
    with progress.track(desc, total=len(items), unit=unit) as bar:
        for result in _map_tasks(runtime, fn, items, num_cpus, window, kind):
            bar.add(1)
            yield result


def _map_tasks(runtime: Any, fn: Any, items: Iterable[Any], num_cpus: float, window: int | None,
               kind: str) -> Iterator[Any]:
    if runtime.runner == "local":
        for item in items:
            yield fn(item)
        return
    import collections

    import ray

    from influencespace import storage

    ensure_ray(runtime)
    if window is None:
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    remote = ray.remote(_task_entry).options(num_cpus=num_cpus, **placement(runtime, kind))
    settings = ray.put(storage.current_settings())
    fn_ref = ray.put(fn)
    pending: collections.deque = collections.deque()

    def result(ref: Any) -> Any:
        try:
            return ray.get(ref)
        except Exception as exc:
            found = domain_error(exc)
            if found is not None:
                raise found from None
            raise

    for item in items:
        pending.append(remote.remote(settings, fn_ref, item))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


# --------------------------------------------------------------------------------------------------
# One-rank process group (runtime.runner: local, and the influence stage's open_clip proxy)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LOCAL_GROUP_BACKEND: str | None = None  # the one-rank group this module created, if any


@contextlib.contextmanager
def local_process_group(use_gpu: bool) -> Iterator[Any]:
    """A one-rank process group on loopback, what DeepSpeed expects to find; yields the device.

    The group is created once per process and then reused, never destroyed: DeepSpeed caches the
    groups it was handed (``deepspeed.utils.groups``), and a second group in the same process would not
    match those caches. It ends with the process.
    """
    import torch
    import torch.distributed as dist

    global _LOCAL_GROUP_BACKEND
    backend = "nccl" if use_gpu else "gloo"
    if use_gpu and not torch.cuda.is_available():
        raise ConfigError("runtime.use_gpu=true but torch sees no CUDA device")
    if dist.is_initialized() and _LOCAL_GROUP_BACKEND != backend:
        raise InfluenceSpaceError(
            "runtime.runner=local trains in this process but another torch.distributed group already exists; "
            "use runtime.runner=ray, or run the stage in a fresh process"
        )
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # DeepSpeed reads LOCAL_RANK even when it is handed an existing group
    try:
        if not dist.is_initialized():
            port = _free_port()
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            _LOCAL_GROUP_BACKEND = backend
        yield torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
