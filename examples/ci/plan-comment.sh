#!/bin/sh
# Turn `reconcile --plan` output into a review comment (Markdown): the summary first, the
# destructive and refused lines called out, the whole plan folded below.
#   usage: plan-comment.sh plan.txt plan.jsonl
set -eu
text=$1 jsonl=$2
summary=$(tail -n 1 "$text")
echo "### mailferry plan"
echo
echo "**$summary**"
echo
# Lines marked "-" (destructive) or "!" (failed, refused, conflict) need a reviewer's eye.
flagged=$(grep -E '^  [-!] ' "$text" || true)
if [ -n "$flagged" ]; then
  echo "Needs attention (destructive steps and refused changes):"
  echo
  echo '```'
  echo "$flagged"
  echo '```'
  echo
fi
warnings=$(grep '"type": "warning"' "$jsonl" | sed 's/.*"message": "\(.*\)"}/- \1/' || true)
if [ -n "$warnings" ]; then
  echo "Warnings:"
  echo
  echo "$warnings"
  echo
fi
echo "<details><summary>Full plan</summary>"
echo
echo '```'
cat "$text"
echo '```'
echo "</details>"
