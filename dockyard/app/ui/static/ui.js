// The dashboard's live parts, without a library: an element with data-refresh="MS" is
// fetched again from the page's own address every MS milliseconds and replaced (it stops
// once the fresh page no longer marks it live); data-countdown="EPOCH" counts down to a
// time; #browser-zone names the browser's time zone.
(function () {
  "use strict";

  function schedule(el) {
    var ms = parseInt(el.getAttribute("data-refresh"), 10);
    if (ms > 0) setTimeout(function () { refresh(el); }, ms);
  }

  function refresh(el) {
    fetch(location.href, {headers: {"X-Dockyard-Refresh": "1"}, credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { schedule(el); return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(el.id);
        if (!fresh) return;
        el.replaceWith(fresh);
        countdowns();
        schedule(fresh);
      })
      .catch(function () { schedule(el); });
  }

  function span(s) {
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h";
  }

  function countdowns() {
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-countdown]").forEach(function (el) {
      var left = parseFloat(el.getAttribute("data-countdown")) - now;
      el.textContent = left >= 0 ? "in " + span(left) : span(-left) + " ago";
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(schedule);
    var zone = document.getElementById("browser-zone");
    if (zone) zone.textContent = Intl.DateTimeFormat().resolvedOptions().timeZone;
    countdowns();
    setInterval(countdowns, 1000);
  });
})();
