// cxr-triage pages: bars drawn from data attributes (the page's CSP forbids inline styles),
// and the worklist table refreshed in place with the page's own filters (its query string).
(function () {
  "use strict";

  function drawBars(root) {
    root.querySelectorAll(".bar .fill[data-width]").forEach(function (el) {
      el.style.width = Math.max(0, Math.min(100, parseFloat(el.dataset.width))) + "%";
    });
    root.querySelectorAll(".col[data-height]").forEach(function (el) {
      el.style.height = Math.max(0, Math.min(100, parseFloat(el.dataset.height))) + "%";
    });
    root.querySelectorAll(".bar .thr[data-left]").forEach(function (el) {
      el.style.left = Math.max(0, Math.min(100, parseFloat(el.dataset.left))) + "%";
    });
  }

  function startRefresh() {
    var body = document.getElementById("worklist-rows");
    var live = document.getElementById("live");
    if (!body || !live) return;
    var seconds = Math.max(2, parseInt(live.dataset.refresh, 10) || 5);
    var url = body.dataset.partial + window.location.search;
    function tick() {
      if (document.hidden) return;
      fetch(url, { credentials: "same-origin", cache: "no-store" })
        .then(function (rsp) {
          if (!rsp.ok) throw new Error("HTTP " + rsp.status);
          return rsp.text();
        })
        .then(function (html) {
          body.innerHTML = html;
          live.classList.remove("stale");
          live.textContent = "updated " + new Date().toLocaleTimeString();
          document.body.dataset.refreshed = String((parseInt(document.body.dataset.refreshed, 10) || 0) + 1);
        })
        .catch(function (err) {
          live.classList.add("stale");
          live.textContent = "not updated: " + err.message;
        });
    }
    window.setInterval(tick, seconds * 1000);
  }

  function autoSubmit() {
    var form = document.getElementById("filters");
    if (!form) return;
    form.querySelectorAll("select").forEach(function (sel) {
      sel.addEventListener("change", function () { form.submit(); });
    });
  }

  // Reader feedback on the study page: each button posts one verdict to the JSON API.
  function startFeedback() {
    var box = document.getElementById("feedback");
    if (!box) return;
    var status = document.getElementById("fb-status");
    var note = document.getElementById("fb-note");
    var other = document.getElementById("fb-other");
    box.querySelectorAll("button.vd").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var finding = btn.classList.contains("other") && other ? other.value : btn.dataset.finding;
        var body = { finding: finding, verdict: btn.dataset.verdict };
        if (note && note.value.trim()) body.note = note.value;
        if (status) status.textContent = "saving…";
        fetch("/api/studies/" + encodeURIComponent(box.dataset.study) + "/feedback", {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(body)
        })
          .then(function (rsp) {
            return rsp.json().then(function (data) {
              if (!rsp.ok) throw new Error(data.detail || "HTTP " + rsp.status);
              return data;
            });
          })
          .then(function (saved) {
            box.querySelectorAll("button.vd").forEach(function (b) {
              if (b.dataset.finding === saved.finding) b.classList.toggle("on", b.dataset.verdict === saved.verdict);
            });
            if (note) note.value = "";
            if (status) { status.classList.remove("err"); status.textContent = "saved: " + saved.finding + " " + saved.verdict; }
            box.dataset.saved = String((parseInt(box.dataset.saved, 10) || 0) + 1);
          })
          .catch(function (err) {
            if (status) { status.classList.add("err"); status.textContent = "not saved: " + err.message; }
          });
      });
    });
  }

  drawBars(document);
  startFeedback();
  startRefresh();
  autoSubmit();
})();
