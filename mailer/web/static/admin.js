// The admin UI's behaviour. Loaded as a file because the CSP allows no inline script.
// Everything works without it except the live preview, progress updates and the chart.
"use strict";

(function () {
  // Confirm dangerous actions: data-confirm on a form or on the button that submits it.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var button = event.submitter;
    var message = (button && button.dataset.confirm) || form.dataset.confirm;
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  function sessionExpired(response) {
    return response.redirected && /\/admin\/login$/.test(new URL(response.url).pathname);
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (sessionExpired(r)) {
        throw new Error("your session expired; reload the page to log in again");
      }
      if (!r.ok) {
        throw new Error("HTTP " + r.status);
      }
      return r.json();
    });
  }

  // Live preview -------------------------------------------------------------------
  // The draft goes to the server (with the CSRF token, as form fields), which renders it
  // with the real email template; the sandboxed frame then loads the result by URL, so
  // the email keeps its inline styles without relaxing this page's CSP.
  function setUpPreview(form) {
    var frame = document.getElementById("preview");
    var status = document.getElementById("preview-status");
    if (!frame || form.querySelector("fieldset[disabled]")) {
      return;
    }
    var timer = null;
    var inFlight = false;
    var again = false;

    function load(url) {
      try {
        frame.contentWindow.location.replace(url); // no history entry per keystroke
      } catch (e) {
        frame.src = url;
      }
    }

    function refresh() {
      if (inFlight) {
        again = true;
        return;
      }
      inFlight = true;
      status.textContent = "Updating preview…";
      var body = new URLSearchParams(new FormData(form));
      fetch(form.dataset.previewUrl, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        cache: "no-store",
      })
        .then(function (r) {
          if (sessionExpired(r)) {
            throw new Error("your session expired; save your text elsewhere and log in again");
          }
          return r.json().then(function (data) {
            if (!r.ok) {
              throw new Error(data.detail || "HTTP " + r.status);
            }
            return data;
          });
        })
        .then(function (data) {
          load(data.url);
          status.textContent = "Preview updated.";
        })
        .catch(function (err) {
          status.textContent = "Preview not updated: " + err.message;
        })
        .finally(function () {
          inFlight = false;
          if (again) {
            again = false;
            refresh();
          }
        });
    }

    form.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(refresh, 400);
    });
    if (!form.action.match(/\/statements\/\d+$/)) {
      // A new draft: show something as soon as there is text (e.g. after a failed save).
      if (form.elements.body_markdown.value || form.elements.title.value) {
        refresh();
      }
    }
  }

  // Blast progress -----------------------------------------------------------------
  function setUpProgress(box) {
    var bar = box.querySelector("[role=progressbar]");
    var fill = box.querySelector(".bar-fill");
    var field = function (name) {
      return box.querySelector("[data-field=" + name + "]");
    };

    function show(percent) {
      bar.setAttribute("aria-valuenow", String(percent));
      bar.setAttribute("aria-valuetext", percent + "%");
      fill.style.width = percent + "%"; // CSSOM, which the CSP allows (attributes it doesn't)
    }

    function update(p) {
      show(p.percent);
      var badge = field("status");
      badge.textContent = p.status;
      badge.className = "badge badge-" + p.status;
      field("text").textContent =
        p.percent + "% · " + p.sent + " sent, " + p.failed + " failed, " + p.skipped +
        " skipped of " + p.total;
      var reason = field("reason");
      reason.textContent = p.reason || "";
      reason.hidden = !p.reason;
      box.querySelectorAll("form[data-show-when]").forEach(function (f) {
        f.hidden = f.dataset.showWhen.split(" ").indexOf(p.status) < 0;
      });
    }

    // The page already knows the figure: draw it at once, animate only later changes.
    fill.style.transition = "none";
    show(Number(bar.getAttribute("aria-valuenow")) || 0);
    void fill.offsetWidth;
    fill.style.transition = "";
    if (box.dataset.final === "true") {
      return;
    }
    var timer = setInterval(function () {
      getJSON(box.dataset.progressUrl)
        .then(function (p) {
          update(p);
          if (p.final) {
            clearInterval(timer);
          }
        })
        .catch(function (err) {
          field("text").textContent = "Progress not updated: " + err.message;
        });
    }, 1500);
  }

  // Queue panel and send-rate chart ------------------------------------------------------
  var SVG = "http://www.w3.org/2000/svg";

  function svg(name, attrs, text) {
    var el = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) {
      el.setAttribute(k, String(attrs[k]));
    });
    if (text !== undefined) {
      el.textContent = text;
    }
    return el;
  }

  function hhmm(epoch) {
    return new Date(epoch * 1000).toISOString().slice(11, 16);
  }

  function drawChart(chart, perMinute, total) {
    var W = 640, H = 200, left = 44, right = 8, top = 10, bottom = 26;
    var max = 0;
    perMinute.forEach(function (m) {
      max = Math.max(max, m.sent);
    });
    var scale = max > 0 ? max : 1;
    var title = chart.querySelector("title");
    while (chart.lastChild) {
      chart.removeChild(chart.lastChild);
    }
    title.textContent =
      "Messages sent per minute over the last hour: " + total + " in all, at most " + max +
      " in one minute";
    chart.appendChild(title);
    var plotW = W - left - right, plotH = H - top - bottom;
    var step = plotW / perMinute.length;
    [0, 0.5, 1].forEach(function (f) {
      var y = top + plotH * (1 - f);
      chart.appendChild(svg("line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }));
      chart.appendChild(
        svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" },
          String(Math.round(max * f)))
      );
    });
    perMinute.forEach(function (m, i) {
      var h = (m.sent / scale) * plotH;
      var bar = svg("rect", {
        x: left + i * step + 1,
        y: top + plotH - h,
        width: Math.max(step - 2, 1),
        height: Math.max(h, m.sent > 0 ? 1 : 0),
        class: "col",
      });
      bar.appendChild(svg("title", {}, hhmm(m.minute) + " UTC: " + m.sent + " sent"));
      chart.appendChild(bar);
    });
    [0, 15, 30, 45, 59].forEach(function (i) {
      if (!perMinute[i]) {
        return;
      }
      var anchor = i === 0 ? "start" : i === 59 ? "end" : "middle";
      var x = i === 0 ? left : i === 59 ? W - right : left + i * step + step / 2;
      chart.appendChild(
        svg("text", { x: x, y: H - 6, class: "axis", "text-anchor": anchor },
          hhmm(perMinute[i].minute))
      );
    });
  }

  function setUpQueue(panel) {
    var chart = document.getElementById("rate-chart");
    function tick() {
      getJSON(panel.dataset.url)
        .then(function (q) {
          ["queued", "in_progress", "deferred", "active_blasts", "sent_last_hour"].forEach(
            function (name) {
              document.querySelectorAll("[data-field=" + name + "]").forEach(function (el) {
                el.textContent = String(q[name]);
              });
            }
          );
          if (chart) {
            drawChart(chart, q.per_minute, q.sent_last_hour);
          }
        })
        .catch(function (err) {
          var where = document.getElementById("sent-last-hour");
          if (where) {
            where.textContent = "(not updated: " + err.message + ")";
          }
        });
    }
    tick();
    setInterval(tick, 2000);
  }

  // Copy buttons ------------------------------------------------------------------------
  // data-copy names the field whose text goes to the clipboard; the buttons stay hidden
  // without this script (the text can still be selected and copied by hand).
  function setUpCopy(button) {
    var field = document.getElementById(button.dataset.copy);
    var status = document.getElementById(button.dataset.copyStatus);
    if (!field) {
      return;
    }
    function told(ok) {
      if (status) {
        status.textContent = ok ? "Copied." : "Not copied: select the text and press Ctrl+C.";
      }
    }
    function byHand() {
      field.focus();
      field.select();
      var ok = false;
      try {
        ok = document.execCommand("copy");
      } catch (e) {
        ok = false;
      }
      told(ok);
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(function () {
          told(true);
        }, byHand);
      } else {
        byHand();
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("button[data-copy]").forEach(setUpCopy);
    var compose = document.getElementById("compose");
    if (compose) {
      setUpPreview(compose);
    }
    document.querySelectorAll("[data-progress-url]").forEach(setUpProgress);
    var queue = document.getElementById("queue-panel");
    if (queue) {
      setUpQueue(queue);
    }
  });
})();
