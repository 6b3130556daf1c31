// The dashboard's own script. No inline script anywhere (the Content-Security-Policy forbids it):
// the pages say what they need with data- attributes.
(function () {
  "use strict";

  // Live events: when the page names an SSE stream (data-events-url on <body>, set when the app
  // has events on and the stream is served), each event makes the live parts refresh at once
  // (they listen for "tm-event" on <body>; without a stream they poll every few seconds).
  function listen(url) {
    if (!window.EventSource) {
      return;
    }
    var source = new EventSource(url);
    var queued = false;
    function received(message) {
      showEvent(message.data);
      if (queued) {
        return;
      }
      queued = true;
      window.setTimeout(function () {
        queued = false;
        document.body.dispatchEvent(new CustomEvent("tm-event"));
      }, 250);
    }
    source.addEventListener("job", received); // what web/sse.py sends: "event: job"
    source.addEventListener("message", received); // unnamed events
  }

  // On a job's page, each event is added to its list of live events.
  function showEvent(data) {
    var list = document.querySelector("[data-live-events]");
    if (!list) {
      return;
    }
    var event;
    try {
      event = JSON.parse(data);
    } catch (e) {
      return;
    }
    var item = document.createElement("li");
    var when = new Date((event.at || 0) * 1000).toISOString().replace("T", " ").slice(0, 19);
    var text = when + " UTC " + (event.state || "?");
    if (event.progress !== null && event.progress !== undefined) {
      text += " " + Math.round(event.progress * 100) + " %";
    }
    if (event.message) {
      text += " " + event.message;
    }
    item.textContent = text; // text, never HTML: an event carries what a task wrote
    list.appendChild(item);
  }

  // A checkbox with data-select-all="NAME" ticks every checkbox named NAME in its form.
  document.addEventListener("change", function (e) {
    var box = e.target;
    if (!box.matches || !box.matches("[data-select-all]")) {
      return;
    }
    var name = box.getAttribute("data-select-all");
    box.form.querySelectorAll('input[type="checkbox"]').forEach(function (other) {
      if (other.name === name) {
        other.checked = box.checked;
      }
    });
  });

  // A submit button with data-confirm="QUESTION" submits only once the user says yes (the
  // actions that change many jobs at once). Capture phase: before htmx sees the submit.
  document.addEventListener(
    "submit",
    function (e) {
      var question = e.submitter && e.submitter.getAttribute("data-confirm");
      if (question && !window.confirm(question)) {
        e.preventDefault();
        e.stopPropagation();
      }
    },
    true
  );

  var url = document.body.getAttribute("data-events-url");
  if (url) {
    listen(url);
  }
})();
