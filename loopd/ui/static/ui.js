// loopd's web UI: the live stream and the buttons' answers. Every page reads without it.
"use strict";

function flash(text, tone) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = text;  // text, never HTML: an answer may quote event data
  box.className = tone;
}

// live updates: a server-sent event replaces the part of the page it names
function connectLive(badge) {
  const target = document.getElementById(badge.dataset.target);
  const stream = new EventSource(badge.dataset.live);
  stream.onopen = () => { badge.textContent = "live"; badge.className = "live on"; };
  stream.onerror = () => { badge.textContent = "disconnected"; badge.className = "live off"; };
  stream.addEventListener(badge.dataset.target, (event) => {
    // the server renders this HTML with every value escaped, as it renders the page
    if (target) target.innerHTML = event.data;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".live[data-live]").forEach(connectLive);
});

// a button posted to the API: say how it went; on success show the page as it is now
document.addEventListener("htmx:afterRequest", (event) => {
  const xhr = event.detail.xhr;
  let answer = {};
  try { answer = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
  if (event.detail.successful) {
    flash("done: " + (answer.status || (answer.approved === true ? "approved" :
          answer.approved === false ? "rejected" : xhr.status)), "ok");
    setTimeout(() => window.location.reload(), 600);
  } else {
    flash("refused (" + xhr.status + "): " + (answer.error || xhr.statusText), "bad");
  }
});
