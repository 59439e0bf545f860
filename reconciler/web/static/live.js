// mailferry status page: re-fetch the live part every two seconds and swap it in.
// The server renders it (escaped); nothing here builds HTML from data.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || !window.fetch) { return; }
  var url = main.getAttribute("data-live");
  var busy = false;
  function refresh() {
    var focus = document.activeElement;
    if (busy || document.hidden) { return; }
    if (focus && main.contains(focus) && /^(SELECT|INPUT|BUTTON)$/.test(focus.tagName)) { return; }
    busy = true;
    fetch(url, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html !== null) { main.innerHTML = html; main.setAttribute("data-updated", String(Date.now())); }
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }
  setInterval(refresh, 2000);
})();
