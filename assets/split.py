"""Graph-backed assets whose work splits over workers: N part steps, then one step that finishes the asset.

Steps depend on each other through Nothing (every result goes through Delta), so any executor runs the
parts at once without an IO manager. With one worker the part and the finish run in one step: no process
start spent on splitting what is not split.
"""

from collections.abc import Callable, Iterator

import dagster as dg

from assets.checks import check_outputs
from resources.delta import DeltaStore

Part = Callable[[dg.OpExecutionContext, DeltaStore, int], None]  # does part i of the work
Finish = Callable[[dg.OpExecutionContext, DeltaStore], Iterator]  # yields the asset's Output and check results


def split_steps(
    asset: str,
    workers: int,
    deps: tuple[str, ...],
    checks: list[dg.AssetCheckSpec],
    part: tuple[str, Part, dict[str, str]],
    finish: tuple[str, Finish, dict[str, str]],
    whole: str,
) -> Callable[..., dict]:
    """The composition of a graph-backed `asset`: `workers` steps named `<part name>_<i>` (each waiting on
    every input of `deps`), then the finish step; with one worker, one step named `whole` (with the part's
    tags) doing both. part and finish are (op name, function, op tags). Returns compose(**inputs) -> the
    graph's outputs (the asset and its `checks`)."""
    outputs = [asset, *check_outputs(asset, checks)]
    outs = {name: dg.Out(dg.Nothing) for name in outputs}
    ins = {name: dg.In(dg.Nothing) for name in deps}
    (part_name, do_part, part_tags), (finish_name, do_finish, finish_tags) = part, finish

    if workers == 1:

        @dg.op(name=whole, ins=ins, out=outs, tags=part_tags)
        def both(context: dg.OpExecutionContext, delta: DeltaStore):
            do_part(context, delta, 0)
            yield from do_finish(context, delta)

        return lambda **inputs: dict(zip(outputs, both(**inputs)))

    def part_op(index: int) -> dg.OpDefinition:
        @dg.op(name=f"{part_name}_{index}", ins=ins, out=dg.Out(dg.Nothing), tags=part_tags)
        def one_part(context: dg.OpExecutionContext, delta: DeltaStore) -> None:
            do_part(context, delta, index)

        return one_part

    @dg.op(name=finish_name, ins={"parts": dg.In(dg.Nothing)}, out=outs, tags=finish_tags)
    def last(context: dg.OpExecutionContext, delta: DeltaStore):
        yield from do_finish(context, delta)

    parts = [part_op(index) for index in range(workers)]
    return lambda **inputs: dict(zip(outputs, last(parts=[p(**inputs) for p in parts])))
