// The overview reloads itself every data-refresh seconds, unless the operator is typing.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (seconds > 0) {
    window.setInterval(function () {
      var active = document.activeElement;
      if (active && (active.tagName === "INPUT" || active.tagName === "TEXTAREA")) return;
      window.location.reload();
    }, seconds * 1000);
  }
})();
