"""Optional scale-out on Ray: feature extraction, PTS pixel blocks and matching run on a cluster's actors.

On when ``cluster.address`` in ``params.yaml`` or ``$RAY_ADDRESS`` is set (:func:`enabled`); hetmm then connects to
that running cluster and never starts one. Each result equals the local run's, so the outputs DVC sees do not
depend on where they were computed:

* :class:`ExtractorPool`: ``cluster.workers`` actors each load the backbone once (on a GPU when
  ``gpus_per_worker`` > 0); image batches go round-robin, features come back in order and the driver writes the
  feature cache as it always does.
* :class:`ShardedMatcher`: the template's sheets split into shards of at most ``cluster.shard_bytes``, each held in
  memory by an actor (with ``workers // shards`` replicas, which share the query batches). Every matching distance
  is a minimum over sheets, so the shards' distances min-merge exactly (:meth:`LayerMatches.merged`).
* :func:`pts_pixels`: PTS is independent per pixel; each layer's pixels go out in blocks as Ray tasks.

Faults: an actor or task whose process dies is restarted and its pending work retried up to
``cluster.max_retries`` times (Ray's own restart); beyond that the stage fails with :class:`WorkerLost` before any
stage record or output file is written. Ray itself is imported here only, on first use (``pip install
'hetmm[ray]'``).
"""

from __future__ import annotations

import math
import os
import resource
import socket
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hetmm.config import ClusterConfig, FeatureConfig, MatchingConfig
from hetmm.core.device import resolve_device
from hetmm.core.features import FeatureExtractor
from hetmm.core.scoring import LayerMatches, match_layers
from hetmm.core.templates import TemplateSet
from hetmm.core.templates.store import pts_pixels as local_pts_pixels
from hetmm.errors import ConfigError, HetmmError

ADDRESS_ENV = "RAY_ADDRESS"
CONNECT_TIMEOUT_S = 10.0  # a cluster that does not answer within this is reported, not waited for
IN_FLIGHT = 2  # batches queued per actor: keeps every actor busy without holding the whole split in memory


class WorkerLost(HetmmError):
    """A Ray worker died more often than ``cluster.max_retries`` allows."""


def enabled(cluster: ClusterConfig) -> bool:
    return bool(cluster.address or os.environ.get(ADDRESS_ENV))


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("cluster: Ray is not installed; pip install 'hetmm[ray]' (or unset RAY_ADDRESS and "
                          "cluster.address to run locally)") from None
    return ray


def connect(cluster: ClusterConfig) -> Any:
    """The ``ray`` module, connected to the configured cluster (an existing connection is kept)."""
    ray = _ray()
    if not ray.is_initialized():
        address, key = (cluster.address, "cluster.address") if cluster.address else \
            (os.environ.get(ADDRESS_ENV), f"${ADDRESS_ENV}")
        check_address(address, key)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise HetmmError(f"{key}: cannot connect to the Ray cluster at {address!r} ({str(exc)[:200]}); start it "
                             f"(`ray start --head`), fix {key} or unset it to run locally") from None
    return ray


def check_address(address: str | None, key: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse ``local`` (it would start a cluster) and, for ``host:port`` or ``ray://host:port``, a host that does
    not resolve or a port that does not answer within ``timeout`` seconds, naming ``key``: Ray itself would retry
    for minutes without a word. ``auto`` is left to Ray, which fails at once when no cluster runs here."""
    fix = f"start the cluster (`ray start --head` prints its address), fix {key} or unset it to run locally"
    if address in (None, "", "auto"):
        return
    if address == "local":
        raise ConfigError(f"{key}: 'local' would start a new Ray cluster, and hetmm only connects to a running one; "
                          f"{fix}")
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 literal: [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {address!r} is not host:port (port 1-65535), ray://host:port or auto; {fix}")
    found: list[Any] = []
    resolver = threading.Thread(target=lambda: found.append(_resolve(host, int(port))), daemon=True)
    resolver.start()  # getaddrinfo has no timeout of its own; a daemon thread never delays the exit
    resolver.join(timeout)
    if not found or isinstance(found[0], OSError):
        why = "no answer from the name service" if not found else found[0].strerror or str(found[0])
        raise HetmmError(f"{key}: cannot resolve the Ray host {host!r} of {address!r} ({why}); {fix}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            # Ray's head (GCS or client server) speaks gRPC: HTTP/2 answers its preface with a SETTINGS frame.
            # Anything else (an ssh or web port) would keep ray.init retrying for minutes.
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            answer = conn.recv(9)
    except OSError as exc:
        raise HetmmError(f"{key}: nothing answers at {address!r} within {timeout:g} s ({exc.strerror or exc}); "
                         f"{fix}") from None
    if len(answer) < 4 or answer[3] != 4:
        raise HetmmError(f"{key}: {address!r} answers, but not as a Ray cluster (no gRPC); {fix}")


def _resolve(host: str, port: int) -> Any:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return exc


def _get(ray: Any, refs: Any) -> Any:
    try:
        return ray.get(refs)
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as exc:
        raise WorkerLost(f"cluster: a Ray worker died and its retries are used up ({type(exc).__name__}); nothing "
                         "of this stage was recorded; check the workers' memory (`ray status`) and rerun") from None


def _options(cluster: ClusterConfig) -> dict[str, Any]:
    return {"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker,
            "max_restarts": cluster.max_retries, "max_task_retries": cluster.max_retries}


def _device(cluster: ClusterConfig) -> str:
    return "cuda" if cluster.gpus_per_worker > 0 else "cpu"


# Tensors cross the object store as numpy arrays: Ray stores those without a copy (measured 2.5x faster than
# pickled tensors for a batch of features). What comes back is read-only, which matching never needs to change.
def _arrays(tensors: Sequence[Tensor | None]) -> list[np.ndarray | None]:
    return [None if t is None else t.detach().cpu().numpy() for t in tensors]


def _tensors(arrays: Sequence[np.ndarray | None]) -> list[Tensor | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return [None if a is None else torch.from_numpy(a) for a in arrays]


class _Worker:
    """What every actor can tell: its process id (the fault tests kill it) and its peak memory."""

    def __init__(self, threads: float) -> None:
        torch.set_num_threads(max(1, int(threads)))

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_bytes(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _ExtractWorker(_Worker):
    def __init__(self, config: FeatureConfig, device: str, threads: float) -> None:
        super().__init__(threads)
        self.extractor = FeatureExtractor(config, resolve_device(device))

    def extract(self, images: list) -> list[np.ndarray]:
        return _arrays(self.extractor(images))


class _MatchWorker(_Worker):
    def __init__(self, sheets: list[Tensor], matching: MatchingConfig, device: str, threads: float) -> None:
        super().__init__(threads)
        self.device = resolve_device(device)
        self.sheets = [t.to(self.device) for t in sheets]
        self.matching = matching

    def match(self, features: list[np.ndarray], first_sheet: int) -> tuple:
        m = self.matching
        sheets = [t[first_sheet:] for t in self.sheets]
        query = [f.to(self.device, sheets[0].dtype) for f in _tensors(features)]
        found = match_layers(query, sheets, m.forward_windows, m.backward_windows, m.alphas, m.weights, m.mode)
        return _arrays(found.forward), _arrays(found.backward), found.plan, found.batch


class ExtractorPool:
    """``cluster.workers`` backbone actors; :meth:`imap` is the pooled form of calling a FeatureExtractor."""

    def __init__(self, config: FeatureConfig, cluster: ClusterConfig) -> None:
        self.ray, self.config = connect(cluster), config
        actor = self.ray.remote(**_options(cluster))(_ExtractWorker)
        self.actors = [actor.remote(config, _device(cluster), cluster.cpus_per_worker)
                       for _ in range(cluster.workers)]

    def imap(self, batches: Iterable[list]) -> Iterator[list[Tensor]]:
        """Per-layer features ``[B, C_j, H_j, W_j]`` of each image batch, in the batches' order."""
        pending: deque = deque()
        for i, batch in enumerate(batches):
            pending.append(self.actors[i % len(self.actors)].extract.remote(batch))
            if len(pending) >= IN_FLIGHT * len(self.actors):
                yield _tensors(_get(self.ray, pending.popleft()))
        while pending:
            yield _tensors(_get(self.ray, pending.popleft()))


def shard_ranges(template: TemplateSet, shard_bytes: int) -> list[tuple[int, int]]:
    """Sheet ranges ``[(a, b), ...]`` of near-equal length, each at most ``shard_bytes`` (one sheet at least)."""
    sheets = template.layers[0].shape[0]
    per_sheet = sum(t[0].nbytes for t in template.layers) if sheets else 1
    count = max(1, math.ceil(sheets / max(1, shard_bytes // per_sheet)))
    bounds = [round(k * sheets / count) for k in range(count + 1)]  # ceil(sheets / count) fit the budget
    return list(zip(bounds[:-1], bounds[1:]))


class ShardedMatcher:
    """The template's sheets held by actors (see the module docstring); :meth:`match` is ``Inspector.match``."""

    def __init__(self, template: TemplateSet, matching: MatchingConfig, cluster: ClusterConfig) -> None:
        self.ray = connect(cluster)
        self.ranges = shard_ranges(template, cluster.shard_bytes)
        replicas = max(1, cluster.workers // len(self.ranges))
        actor = self.ray.remote(**_options(cluster))(_MatchWorker)
        shards = [self.ray.put([t[a:b].contiguous() for t in template.layers]) for a, b in self.ranges]
        self.groups = [[actor.remote(shard, matching, _device(cluster), cluster.cpus_per_worker) for shard in shards]
                       for _ in range(replicas)]
        self._next = 0

    @property
    def actors(self) -> list[Any]:
        return [a for group in self.groups for a in group]

    @property
    def depth(self) -> int:
        """Batches to keep in flight: enough for every replica."""
        return IN_FLIGHT * len(self.groups)

    def describe(self) -> dict[str, int]:
        return {"shards": len(self.ranges), "replicas": len(self.groups), "actors": len(self.actors)}

    def submit(self, features: Sequence[Tensor], first_sheet: int = 0) -> list[Any]:
        """Start matching one batch on the next replica; :meth:`collect` merges the shards' answers."""
        group = self.groups[self._next % len(self.groups)]
        self._next += 1
        ref = self.ray.put(_arrays(features))
        return [actor.match.remote(ref, max(0, first_sheet - a))
                for actor, (a, b) in zip(group, self.ranges) if b > first_sheet]

    def collect(self, refs: list[Any]) -> LayerMatches:
        found = [LayerMatches(_tensors(fwd), _tensors(bwd), plan, batch) for fwd, bwd, plan, batch in
                 _get(self.ray, refs)]
        merged = found[0]
        for other in found[1:]:
            merged = merged.merged(other)
        return merged

    def match(self, features: Sequence[Tensor], first_sheet: int = 0) -> LayerMatches:
        return self.collect(self.submit(features, first_sheet))

    def peak_rss_bytes(self) -> list[int]:
        return _get(self.ray, [a.peak_rss_bytes.remote() for a in self.actors])


def _pts_task(block: Tensor, size: int, min_samples: int) -> tuple[Tensor, Tensor, float, float]:
    return local_pts_pixels(block, size, min_samples)


def pts_pixels(cluster: ClusterConfig, blocks_per_worker: int = 4):
    """A drop-in for :func:`hetmm.core.templates.store.pts_pixels` that sends pixel blocks to Ray tasks."""
    ray = connect(cluster)
    task = ray.remote(num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker,
                      max_retries=cluster.max_retries)(_pts_task)

    def run(vectors: Tensor, size: int, min_samples: int, chunk: int | None = None
            ) -> tuple[Tensor, Tensor, float, float]:
        n, c, h, w = vectors.shape
        flat = vectors.reshape(n, c, 1, h * w)
        count = min(h * w, cluster.workers * blocks_per_worker)
        bounds = [round(k * h * w / count) for k in range(count + 1)]
        refs = [task.remote(flat[..., a:b].contiguous(), size, min_samples) for a, b in zip(bounds, bounds[1:])]
        parts = _get(ray, refs)  # the seconds are the tasks' own, summed over workers
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), sum(p[2] for p in parts),
                sum(p[3] for p in parts))

    return run
