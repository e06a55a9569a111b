"""``tutorial``: ten lessons in the lobby, each checked against real state (``services/tutorial.py``).

Interactive: the lesson is shown, then a ``tutorial>`` prompt: Enter (or ``check``) checks it and moves on when it
passes, ``hint``, ``skip``, ``quit``; anything else runs as a lobby command, so the work is done right there.
Non-interactive (``ssh host tutorial``): the current lesson is checked once and shown. ``tutorial status
[--json]`` re-checks every lesson.
"""

from __future__ import annotations

import argparse

from ussycode.commands.context import CommandContext
from ussycode.commands.registry import command, dispatch, render_error, split_async
from ussycode.services.tutorial import Lesson, Tutorial


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("status", "hint", "skip"), help="status, hint or skip")
    p.add_argument("--lesson", type=int, default=None, help="go to lesson N")
    p.add_argument("--reset", action="store_true", help="start again from lesson 1")
    p.add_argument("--json", action="store_true", help="with status: print JSON")


def _show(ctx: CommandContext, t: Tutorial, lesson: Lesson) -> None:
    ctx.out.print(f"\nLesson {lesson.number} of {len(t.lessons)}: {lesson.title}\n")
    ctx.out.print(t.render(ctx.actor, lesson.text))


async def _check(ctx: CommandContext, t: Tutorial, lesson: Lesson) -> bool:
    passed, detail = await t.check(ctx.actor, lesson)
    if passed:
        await t.record(ctx.actor, lesson.number, "done")
        ctx.out.print(f"done: {detail}")
    else:
        ctx.out.print(f"not yet: {detail} (type 'hint' for a hint)")
    return passed


@command("tutorial", "learn ussycode in ten checked lessons: tutorial [status|hint|skip] [--lesson=N] [--reset]",
         args=_args)
async def tutorial(ctx: CommandContext, a: argparse.Namespace) -> int:
    t = Tutorial(ctx.services)
    if a.reset:
        await t.reset(ctx.actor)
        ctx.out.print("tutorial progress cleared")
    if a.lesson is not None:
        target = t.lesson(a.lesson)
        seen = await t.outcomes(ctx.actor)
        for earlier in t.lessons:  # earlier lessons count as skipped unless done
            if earlier.number < target.number and earlier.number not in seen:
                await t.record(ctx.actor, earlier.number, "skipped")
    if a.action == "status":
        rows = await t.status(ctx.actor)
        if a.json:
            ctx.out.json(rows)
        else:
            for row in rows:
                ctx.out.print(f"{'[x]' if row['done'] else '[ ]'} {row['lesson']:>2} {row['title']}")
        return 0
    lesson: Lesson | None = await t.current(ctx.actor) if a.lesson is None else t.lesson(a.lesson)
    if lesson is None:
        ctx.out.print("You finished the tutorial. 'tutorial status' shows it; 'tutorial --reset' starts again.")
        return 0
    if a.action == "hint":
        ctx.out.print(t.render(ctx.actor, lesson.hint))
        return 0
    if a.action == "skip":
        await t.record(ctx.actor, lesson.number, "skipped")
        ctx.out.print(f"skipped lesson {lesson.number}")
        return 0
    if not ctx.interactive:
        _show(ctx, t, lesson)
        await _check(ctx, t, lesson)
        return 0
    return await _interactive(ctx, t, lesson)


async def _interactive(ctx: CommandContext, t: Tutorial, lesson: Lesson | None) -> int:
    while lesson is not None:
        _show(ctx, t, lesson)
        ctx.out.print("\n(Enter: check it · hint · skip · quit · or any lobby command)")
        while True:
            line = await ctx.ask("tutorial> ")
            if line is None or line.strip() == "quit":
                ctx.out.print("left the tutorial; 'tutorial' picks it up again")
                return 0
            word = line.strip()
            if word in ("", "check"):
                if await _check(ctx, t, lesson):
                    break
            elif word == "hint":
                ctx.out.print(t.render(ctx.actor, lesson.hint))
            elif word == "skip":
                await t.record(ctx.actor, lesson.number, "skipped")
                break
            elif word.split()[0] == "tutorial":
                ctx.out.print("you are in the tutorial already")
            else:
                try:
                    await dispatch(ctx, await split_async(word))
                except Exception as exc:  # rendered like the lobby renders it; the tutorial goes on
                    ctx.out.error(render_error(exc)[0])
        lesson = await t.current(ctx.actor)
    ctx.out.print("\nThat was the last lesson. Well done.")
    return 0
