// domauth panel: progressive enhancement only; every page works without it.
// "Copy" buttons put their value on the clipboard.
(function () {
  "use strict";
  function copied(button) {
    var label = button.textContent;
    button.classList.add("copied");
    button.textContent = "Copied";
    setTimeout(function () {
      button.classList.remove("copied");
      button.textContent = label;
    }, 1500);
  }
  function fallback(text, button) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "absolute";
    area.style.left = "-9999px";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); copied(button); } catch (e) { /* nothing to do */ }
    document.body.removeChild(area);
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (!button) { return; }
    var text = button.getAttribute("data-copy") || "";
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { copied(button); },
        function () { fallback(text, button); });
    } else {
      fallback(text, button);
    }
  });
})();
