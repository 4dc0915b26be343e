/* mailer: the sign-up form on the campaign site, posted in place.
 *
 * Include it with <script src="https://MAILER/embed.js" defer></script> next to a
 * <form data-mailer-form action="https://MAILER/subscribe" method="post">. It posts the
 * form with fetch (a simple CORS request: no preflight), shows the answer inside the
 * form and keeps the visitor on the page. No third-party code, no inline code, no eval:
 * a site CSP needs only this origin in script-src and connect-src. Without JavaScript
 * the form still works: it posts normally (and a "redirect" field brings the visitor back).
 */
(function () {
  "use strict";

  function show(form, message, state) {
    var out = form.querySelector("[data-mailer-message]");
    if (!out) {
      out = document.createElement("p");
      out.setAttribute("data-mailer-message", "");
      out.setAttribute("role", "status");
      out.setAttribute("aria-live", "polite");
      form.appendChild(out);
    }
    out.textContent = message;
    out.setAttribute("data-state", state);
  }

  function answer(response) {
    return response.json().then(
      function (data) { return { status: response.status, data: data || {} }; },
      function () { return { status: response.status, data: {} }; }
    );
  }

  function setup(form) {
    if (form.getAttribute("data-mailer-ready")) { return; }
    form.setAttribute("data-mailer-ready", "1");
    var source = form.querySelector("input[name=source]");
    if (source && !source.value) {
      // The page the visitor signed up on, kept with the consent; no query string.
      source.value = (location.origin + location.pathname).slice(0, 200);
    }
    form.addEventListener("submit", function (event) {
      if (!window.fetch || !window.URLSearchParams || !window.FormData) { return; }
      event.preventDefault();
      var button = form.querySelector("[type=submit]");
      if (button) { button.disabled = true; }
      var body = new URLSearchParams(new FormData(form));
      body.delete("redirect");
      show(form, "Sending…", "pending");
      fetch(form.action, {
        method: "POST",
        body: body,
        headers: { "Accept": "application/json" },
        mode: "cors",
        credentials: "omit"
      })
        .then(answer)
        .then(function (result) {
          if (result.status === 202) {
            show(form, result.data.message || "Thank you. Please check your inbox.", "ok");
            form.reset();
          } else {
            show(form, result.data.detail || ("Something went wrong (" + result.status +
              "). Please try again."), "error");
          }
        }, function () {
          show(form, "Could not reach the server. Please try again.", "error");
        })
        .then(function () { if (button) { button.disabled = false; } });
    });
  }

  function init() {
    var forms = document.querySelectorAll("form[data-mailer-form]");
    for (var i = 0; i < forms.length; i++) { setup(forms[i]); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
