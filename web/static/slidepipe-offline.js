// slidepipe offline mode for the Neuroglancer client shipped in the `neuroglancer` Python package.
//
// That client is built to talk to its Python server: at start it opens an EventSource on
// <prefix>/events/<token> (the server pushes config and state through it) and, while that fails,
// shows "Disconnected from Python server. Retrying...".  Served by plain Apache there is no such
// server; the viewer state comes from the URL fragment (#!{...}) instead.  This script, loaded
// before the client's own scripts, answers that one event-stream URL with a connection that opens
// and stays silent, so the client behaves as a plain viewer.  Every other EventSource is real.
(function () {
  "use strict";
  var match = window.location.pathname.match(/^(.*)\/v\/([^/]+)/);
  if (match === null || typeof window.EventSource !== "function") {
    return;
  }
  var prefix = (window.location.origin + match[1]).replace(/\/+$/, "");
  var eventsUrl = prefix + "/events/" + match[2];
  var RealEventSource = window.EventSource;

  class OfflineEventSource extends EventTarget {
    constructor(url, init) {
      super();
      this.url = String(url);
      this.withCredentials = Boolean(init && init.withCredentials);
      this.readyState = 0;
      this.onopen = null;
      this.onmessage = null;
      this.onerror = null;
      var self = this;
      window.setTimeout(function () {
        if (self.readyState !== 0) {
          return;
        }
        self.readyState = 1;
        var event = new Event("open");
        if (typeof self.onopen === "function") {
          self.onopen(event);
        }
        self.dispatchEvent(event);
      }, 0);
    }
    close() {
      this.readyState = 2;
    }
  }
  OfflineEventSource.CONNECTING = 0;
  OfflineEventSource.OPEN = 1;
  OfflineEventSource.CLOSED = 2;

  function SlidepipeEventSource(url, init) {
    var text = String(url);
    if (text === eventsUrl || text.indexOf(eventsUrl + "?") === 0) {
      return new OfflineEventSource(text, init);
    }
    return new RealEventSource(url, init);
  }
  SlidepipeEventSource.prototype = RealEventSource.prototype;
  SlidepipeEventSource.CONNECTING = 0;
  SlidepipeEventSource.OPEN = 1;
  SlidepipeEventSource.CLOSED = 2;
  window.EventSource = SlidepipeEventSource;
  window.slidepipeOffline = { eventsUrl: eventsUrl };
})();
