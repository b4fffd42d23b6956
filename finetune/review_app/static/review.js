// Keyboard shortcuts of the review form: 1-5 score the current row and move to the next, Up/Down move between
// rows, a/b/t choose A/B/tie, Ctrl+Enter submits. Typing in a text box is never intercepted (but Ctrl+Enter).
// Loaded as a file: the Content-Security-Policy allows no inline script.
(function () {
  "use strict";
  var form = document.getElementById("review");
  if (!form) return;
  var rows = Array.prototype.slice.call(form.querySelectorAll("[data-score-row]"));
  var current = 0;

  function typing(target) {
    var tag = target && target.tagName;
    return tag === "TEXTAREA" || (tag === "INPUT" && target.type !== "radio" && target.type !== "checkbox");
  }

  function show(index, focus) {
    if (!rows.length) return;
    current = Math.max(0, Math.min(rows.length - 1, index));
    rows.forEach(function (row, n) { row.classList.toggle("current", n === current); });
    var row = rows[current];
    if (focus) {
      var radio = row.querySelector("input:checked") || row.querySelector("input");
      if (radio) radio.focus();
      row.scrollIntoView({ block: "nearest" });
    }
  }

  function choose(value) {
    var radio = form.querySelector('input[name="choice"][value="' + value + '"]');
    if (radio) { radio.checked = true; radio.focus(); }
  }

  rows.forEach(function (row, n) {
    row.addEventListener("focusin", function () { show(n, false); });
    row.addEventListener("click", function () { show(n, false); });
  });

  document.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (form.requestSubmit) form.requestSubmit(); else form.submit();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    if (event.key >= "1" && event.key <= "5" && rows.length) {
      var radio = rows[current].querySelector('input[value="' + event.key + '"]');
      if (radio) radio.checked = true;
      event.preventDefault();
      show(current + 1, true);
    } else if (event.key === "ArrowDown" && rows.length) {
      event.preventDefault();
      show(current + 1, true);
    } else if (event.key === "ArrowUp" && rows.length) {
      event.preventDefault();
      show(current - 1, true);
    } else if (event.key === "a" || event.key === "A") {
      choose("A");
    } else if (event.key === "b" || event.key === "B") {
      choose("B");
    } else if (event.key === "t" || event.key === "T") {
      choose("tie");
    }
  });

  // "Start from answer A": copy an answer into the correction box (buttons stay hidden without JavaScript).
  Array.prototype.forEach.call(form.querySelectorAll("[data-copy-from]"), function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      var source = document.getElementById(button.getAttribute("data-copy-from"));
      var box = document.getElementById("corrected_answer");
      if (!source || !box) return;
      if (box.value.trim() && !window.confirm(button.getAttribute("data-confirm") || "")) return;
      box.value = source.textContent;
      box.focus();
    });
  });

  show(0, false);
})();
