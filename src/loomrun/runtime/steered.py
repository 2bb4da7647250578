"""The values loomrun keeps in effect in torch optimizers' param groups, and the step
hooks that keep them: before a steered optimizer's step the value in effect goes in (a
plain float, for the step's arithmetic), after it the script's own comes back, and a
value the step itself wrote over is answered overridden (see runtime.keep)."""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

from loomrun.runtime.keep import Kept, _plain

if TYPE_CHECKING:
    from loomrun.runtime.worker import Worker


class Steered:
    """The values loomrun keeps in effect in the param groups (a Kept per group and key)
    and the step hooks of the optimizers that hold them: a steered optimizer gets a pre-
    and a post-hook of its own, only while it has steered groups. Owned by Optimizers,
    which decides what to keep (put, unset); torch calls the hooks."""

    def __init__(self, worker: Worker):
        self.worker = worker
        # (id of a param group, key) -> Kept; and per optimizer (by id, with a weakref to
        # tell a reused id) the Kept of its groups and the handles of the step hooks it has
        # while it has some (an optimizer with nothing steered has none).
        self.kept: dict[tuple[int, str], Kept] = {}
        self._by_optimizer: dict[int, tuple[weakref.ref, list[Kept], list]] = {}
        self._stale: list = []  # hook handles to remove once no step is running them
        # name -> (the step its change was applied at, the ids of the optimizers that have
        # not stepped with it yet): its answer waits for the last of them, or for the next
        # step's end (an optimizer that steps only now and then is not waited for).
        self.awaiting: dict[str, tuple[int, set[int]]] = {}
        self.steering = False  # something is steered: the schedulers' steps look

    def kept_at(self, group: dict, key: str) -> Kept | None:
        """The Kept of this group's key while a rule holds it."""
        kept = self.kept.get((id(group), key))
        return kept if kept is not None and kept.rules else None

    def own_at(self, group: dict, key: str, value: Any) -> Any:
        """The script's own value of a steered key (what a snapshot keeps), else `value`."""
        kept = self.kept_at(group, key)
        if kept is None:
            return value
        kept.refresh()
        return kept.own

    def written(self, group: dict, key: str) -> None:
        """The group's key holds a value of the script's own again (a rollback put the
        snapshot's back): a steered one gets the value in effect made from it."""
        kept = self.kept_at(group, key)
        if kept is not None:
            kept.settle(again=True)

    @staticmethod
    def _before(entries: list[Kept], optimizer, args, kwargs) -> None:
        """A steered optimizer's own step pre-hook: the value in effect goes in where the
        script wrote the group (Kept.before, inline: the hot path)."""
        for kept in entries:
            first = kept.first
            if kept.group[kept.key] is not kept.put or (
                first is not None and first.own is not kept.basis
            ):
                kept.settle(again=True, stepping=True)
            if kept.plain is not None and not kept.swapped:
                kept.group[kept.key] = kept.plain  # a float's arithmetic in the step

    def _after(self, entries: list[Kept], optimizer, args, kwargs) -> None:
        """A steered optimizer's own step post-hook: a value replaced during the step was
        not in effect; the changes this step ran with can be answered."""
        replaced: dict[str, Any] = {}
        for kept in entries:
            group, key = kept.group, kept.key
            if group[key] is kept.plain and kept.put is not None:  # Kept.after, inline
                group[key] = kept.put
                continue
            value = kept.after()
            if value is not None and kept.rules:
                replaced.setdefault(kept.active[0], _plain(value))
        if not replaced and not self.awaiting:
            return
        done = set()
        for name, (since, waiting) in list(self.awaiting.items()):
            waiting.discard(id(optimizer))
            waiting &= set(self._by_optimizer)  # an optimizer gone will not step
            if not waiting or name in replaced or self.worker.step > since:
                done.add(name)
                del self.awaiting[name]
        for name in replaced:
            self.forget(name, in_hook=True)
        self.worker.stepped(done, replaced)

    def keep(self, optimizer, group: dict, key: str, first: Kept | None) -> Kept:
        kept = self.kept.get((id(group), key))
        if kept is None or kept.group is not group:
            kept = self.kept[(id(group), key)] = Kept(group, key, first)
            self.worker.audits[self] = self.replaced_groups
            found = self._by_optimizer.get(id(optimizer))
            if found is None or found[0]() is not optimizer:
                found = self._by_optimizer[id(optimizer)] = self._hook(optimizer)
            if first is None:
                found[1].insert(0, kept)  # a lead settles before the groups that follow it
            else:
                found[1].append(kept)
        elif first is not None:
            kept.first = first
        return kept

    def forget(self, name: str, in_hook: bool) -> None:
        """No rule of `name` any more; what has no rule left is the script's again."""
        for key, kept in list(self.kept.items()):
            if name not in kept.rules:
                continue
            kept.drop(name)
            if kept.rules:
                kept.settle(again=True)  # the rule under it is in effect again
            else:
                kept.give_back()
                del self.kept[key]
        for oid, (ref, entries, handles) in list(self._by_optimizer.items()):
            entries[:] = [k for k in entries if k.rules]
            if not entries or ref() is None:
                del self._by_optimizer[oid]
                self._stale += handles
        self.steering = bool(self._by_optimizer)
        if not in_hook:  # else a step is running them: they go at the next change
            self._unhook()

    def _hook(self, optimizer) -> tuple[weakref.ref, list[Kept], list]:
        """The optimizer's own step hooks, over its steered groups."""
        entries: list[Kept] = []
        handles = [  # partials: no frame of their own on the hot path
            optimizer.register_step_pre_hook(functools.partial(self._before, entries)),
            optimizer.register_step_post_hook(functools.partial(self._after, entries)),
        ]
        return weakref.ref(optimizer), entries, handles

    def _unhook(self) -> None:
        for handle in self._stale:
            handle.remove()
        self._stale.clear()
        if not self._by_optimizer:
            self.awaiting.clear()

    def arm(self, name: str, optimizers: list) -> None:
        for kept in list(self.kept.values()):
            if kept.rules:
                kept.settle(again=True)
        self._unhook()
        self.awaiting[name] = (self.worker.step, {id(o) for o in optimizers})
        self.steering = True

    def replaced_groups(self) -> dict[str, str]:
        """Steered groups that their optimizer no longer holds (load_state_dict made new
        ones, or the optimizer is gone): the value is not in effect any more. Returns the
        names that ended, each with why; called with each status."""
        live = {}
        for oid, (ref, _, _) in self._by_optimizer.items():
            optimizer = ref()
            live[oid] = {id(g) for g in optimizer.param_groups} if optimizer is not None else set()
        ended: dict[str, str] = {}
        for oid, (_, entries, _) in self._by_optimizer.items():
            for kept in entries:
                if kept.rules and id(kept.group) not in live[oid]:
                    name = kept.active[0]
                    ended.setdefault(
                        name,
                        "the optimizer's param groups were made anew (load_state_dict, or "
                        "a new optimizer): the value is not in effect any more",
                    )
        for name in ended:
            self.awaiting.pop(name, None)
            self.forget(name, in_hook=True)
        return ended

    def kept_in(self, optimizer) -> list[Kept]:
        groups = getattr(optimizer, "param_groups", None) or ()
        ids = {id(g) for g in groups}
        return [k for k in self.kept.values() if k.rules and id(k.group) in ids]

    def exposed(self, optimizer, fn, *args, **kwargs):
        """`fn` runs with the script's own values in the optimizer's steered groups (a
        scheduler computes the script's schedule, chainable or closed-form, and takes its
        base values from them), then the values in effect go back."""
        kept = self.kept_in(optimizer)
        for one in kept:
            one.expose()
        try:
            return fn(*args, **kwargs)
        finally:
            for one in kept:
                one.settle(again=True)
