#!/usr/bin/env python3
"""Step 3 (last) of the `reports` pipeline: a short Markdown report from analyze's numbers.

Input:  analyze's output, {"title", "stats": {...}, "top_words": [...], "excerpt", ...}
Output: {"report": "<markdown>", "stats": {...}} -- the job's result, in the result event.
"""

import json
import os
import sys

from step_io import fail, read_object


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def main():
    data = read_object("the output of analyze")
    if not isinstance(data.get("stats"), dict):
        fail("input must be an object with `stats` (the output of analyze)")

    stats = data["stats"]
    minutes, seconds = divmod(int(stats.get("reading_time_s", 0)), 60)
    top = ", ".join(f"{w} ({n})" for w, n in data.get("top_words", []))
    excerpt = data.get("excerpt")
    lines = [f"# {data.get('title', 'Untitled')}", ""]
    if excerpt:
        lines += [f"> {excerpt}", ""]
    lines += [
        f"- {plural(stats.get('words', 0), 'word')} ({stats.get('unique_words', 0)} distinct) in "
        f"{plural(stats.get('sentences', 0), 'sentence')} and "
        f"{plural(stats.get('paragraphs', 0), 'paragraph')}",
        f"- average word length {stats.get('avg_word_length', 0)} letters",
        f"- reading time {minutes} min {seconds:02d} s",
        f"- top words: {top or 'none'}",
        "",
        f"_job {os.environ.get('WARREN_JOB_ID', 'local')}, "
        f"priority {os.environ.get('WARREN_PRIORITY', 'normal')}_",
    ]
    json.dump({"report": "\n".join(lines) + "\n", "stats": stats}, sys.stdout)


if __name__ == "__main__":
    main()
