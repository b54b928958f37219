#!/usr/bin/env python3
"""Step 2 of the `reports` pipeline: text statistics of the document from `fetch`.

Input:  fetch's output, {"topic", "title", "text", ...}
Output: {"tenant", "topic", "title", "stats": {...}, "top_words": [[word, count], ...], "excerpt"}

Only the numbers travel on, not the text: step outputs cross the broker, keep them small.
Exit 65 (permanent failure) when the input lacks what this step needs.
"""

import collections
import json
import re
import sys

from step_io import fail, read_object

WORDS_PER_MINUTE = 200
STOPWORDS = set(
    "a an and are as at be but by for from in is it its of on or since so that the their this "
    "to while with whereas although because more less".split()
)


def main():
    doc = read_object("the output of fetch")
    if not isinstance(doc.get("text"), str):
        fail("input must be an object with a `text` string (the output of fetch)")

    text = doc["text"]
    words = re.findall(r"[a-z0-9']+", text.lower())
    sentences = [s for s in re.split(r"[.!?]+", text) if s.strip()]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    counts = collections.Counter(w for w in words if w not in STOPWORDS)

    json.dump(
        {
            "tenant": doc.get("tenant"),
            "topic": doc.get("topic"),
            "title": doc.get("title", "Untitled"),
            "stats": {
                "words": len(words),
                "unique_words": len(set(words)),
                "sentences": len(sentences),
                "paragraphs": len(paragraphs),
                "avg_word_length": round(sum(map(len, words)) / len(words), 2) if words else 0,
                "reading_time_s": round(len(words) * 60 / WORDS_PER_MINUTE),
            },
            # Ties broken alphabetically, so the output does not depend on dict order.
            "top_words": sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5],
            "excerpt": sentences[0].strip() + "." if sentences else "",
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
