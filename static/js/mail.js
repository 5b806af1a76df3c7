/* Mailroom email pages: small progressive enhancements; every page works without them. */
(function () {
  "use strict";

  function ready(fn) {
    if (document.readyState !== "loading") fn(); else document.addEventListener("DOMContentLoaded", fn);
  }

  // Rich-text editor over the compose textarea (which stays the source of truth on submit).
  function initEditors() {
    document.querySelectorAll(".editor[data-editor-for]").forEach(function (editor) {
      var textarea = document.getElementById(editor.dataset.editorFor);
      var area = editor.querySelector(".editor-area");
      if (!textarea || !area) return;
      area.innerHTML = textarea.value;
      textarea.hidden = true;
      editor.hidden = false;
      editor.querySelectorAll("[data-cmd]").forEach(function (button) {
        button.addEventListener("click", function () {
          var cmd = button.dataset.cmd, value = null;
          if (cmd === "createLink") {
            value = window.prompt("Link address (https://…)", "https://");
            if (!value || !/^(https?:|mailto:)/i.test(value)) return;
          }
          area.focus();
          document.execCommand(cmd, false, value);
        });
      });
      var form = textarea.form;
      if (form) form.addEventListener("submit", function () { textarea.value = area.innerHTML; });
    });
  }

  // Switching IMAP/POP3 on a preset swaps the incoming server, if the user left it as it was.
  function initPresets() {
    var data = document.getElementById("mail-presets");
    var form = document.getElementById("mailbox-form");
    if (!data || !form) return;
    var presets = JSON.parse(data.textContent);
    var provider = form.querySelector("[name=provider]").value;
    var preset = presets[provider];
    if (!preset) return;
    form.querySelectorAll("input[name=protocol]").forEach(function (radio) {
      radio.addEventListener("change", function () {
        var from = radio.value === "pop3" ? preset : preset.pop3;
        var to = radio.value === "pop3" ? preset.pop3 : preset;
        var host = form.querySelector("[name=incoming_host]");
        var port = form.querySelector("[name=incoming_port]");
        if (host.value === (from.incoming_host || "")) host.value = to.incoming_host || "";
        if (String(port.value) === String(from.incoming_port)) port.value = to.incoming_port;
      });
    });
  }

  // The sandboxed body frame: same origin without scripts, so the page can size it.
  function fitFrame(frame) {
    try {
      var doc = frame.contentDocument;
      // body, not documentElement: the latter is never shorter than the frame itself.
      if (doc && doc.body) frame.style.height = (doc.body.scrollHeight + 24) + "px";
    } catch (e) { /* cross-origin: keep the CSS height */ }
  }

  function initFrames() {
    document.querySelectorAll("iframe.email-frame").forEach(function (frame) {
      frame.addEventListener("load", function () { fitFrame(frame); setTimeout(function () { fitFrame(frame); }, 300); });
      fitFrame(frame);
    });
    document.querySelectorAll("[data-load-images]").forEach(function (link) {
      link.addEventListener("click", function (event) {
        var frame = document.getElementById("email-frame");
        if (!frame) return;
        event.preventDefault();
        frame.src = link.dataset.loadImages;
        var bar = document.getElementById("images-bar");
        if (bar) bar.remove();
      });
    });
  }

  // A slow submit (testing a connection, sending) shows it is busy and cannot be sent twice.
  function initBusyButtons() {
    document.querySelectorAll("button[data-busy-label]").forEach(function (button) {
      var form = button.form;
      if (!form) return;
      form.addEventListener("submit", function () {
        setTimeout(function () { button.disabled = true; button.textContent = button.dataset.busyLabel; }, 0);
      });
    });
  }

  ready(function () { initEditors(); initPresets(); initFrames(); initBusyButtons(); });
})();
