"""Tensors alive at the peak of one CPU inference forward (torch allocations only).

    PYTHONPATH=. python benchmarks/live_set.py configs/vim/vim-tiny_8xb128_in1k.py --size 1024

Runs one untimed forward (``--cold``: none), then one forward under
``torch.profiler`` with ``profile_memory=True``, replays its allocation / free events
in time order and prints the peak of the live bytes above the start and every block
alive at that moment (largest first) with the op that allocated it. What the exact
RSS measurement (``MALLOC_MMAP_THRESHOLD_=65536``, see README) adds on top is memory
outside torch's allocator: mostly library code paged in by a model's first forward.
Reads the profiler's event tree (``torch._C._profiler``, a private API of torch 2.x).
"""
import argparse
import os.path as osp
import sys
from typing import Dict, List, Tuple

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools',
                            'analysis_tools'))
from _model_utils import (build_model, dummy_input, load_config, task_of,  # noqa: E402
                          tensor_forward)


def allocations(prof) -> List[Tuple[int, int, int, str]]:
    """(time ns, address, bytes (negative: a free), 'op/op/op' that allocated it)."""
    out = []

    def walk(ev, stack: List[str]) -> None:
        if ev.tag == _EventType.Allocation:
            f = ev.extra_fields
            out.append((ev.start_time_ns, f.ptr, f.alloc_size, '/'.join(stack[-3:])))
        for child in ev.children:
            walk(child, stack + [ev.name] if ev.tag == _EventType.TorchOp else stack)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    return sorted(out)


def live_at_peak(events) -> Tuple[int, Dict[int, Tuple[int, str]]]:
    """Peak live bytes above the start and the blocks alive then {address: (bytes, op)}."""
    live, cur, peak, at_peak = {}, 0, 0, {}
    for _, ptr, size, name in events:
        if size > 0:
            live[ptr] = (size, name)
        else:
            live.pop(ptr, None)
        cur += size
        if cur > peak:
            peak, at_peak = cur, dict(live)
    return peak, at_peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('config')
    ap.add_argument('--size', type=int, default=1024, help='square input side')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--cold', action='store_true', help='profile the first forward')
    ap.add_argument('--min-kb', type=float, default=64, help='smallest block listed')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, None)
    task = task_of(cfg)
    model = build_model(cfg, device='cpu')
    x = dummy_input(task, (args.size, args.size), 1, 'cpu')
    fwd = tensor_forward(model, task, 1, args.size, args.size)
    with torch.no_grad():
        if not args.cold:
            fwd(x)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fwd(x)
    peak, blocks = live_at_peak(allocations(prof))
    print(f'{args.config} {args.size}^2: peak live {peak / 2**20:.2f} MiB above the start')
    for size, name in sorted(blocks.values(), key=lambda v: -v[0]):
        if size >= args.min_kb * 1024:
            print(f'  {size / 2**20:7.2f} MiB  {name}')


if __name__ == '__main__':
    main()
